"""The latent-space bias of uncertainty-driven dynamics (mlforce.bias)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlforce.bias import latent_bias
from mlforce.calculators.ml import MLForceCalculator
from mlforce.checkpoint import save_checkpoint
from mlforce.config import Config
from mlforce.data import graphs_from_frames
from mlforce.errors import ConfigError
from mlforce.graph import batch_graphs
from mlforce.latent import LatentReference, atom_features
from tests.conftest import distorted_ethanol, make_model, random_rotation


@pytest.fixture(scope="module")
def setup():
    model = make_model(species=(1, 6, 8), features=16, cutoff=4.0)
    train = distorted_ethanol(10, 0.05, seed=0)
    graphs = graphs_from_frames(train, model.species, 4.0, torch.float64, with_labels=False)
    reference = LatentReference.build(atom_features(model, graphs), [a.numbers for a in train])
    return model, reference


def _graph(model, frames):
    return batch_graphs(
        graphs_from_frames(frames, model.species, 4.0, torch.float64, with_labels=False)
    )


def test_bias_forces_are_minus_its_gradient_and_the_energy_is_bounded(setup):
    model, reference = setup
    atoms = distorted_ethanol(1, 0.15, seed=3)[0]
    energy, forces = latent_bias(model, _graph(model, [atoms]), reference, 0.3, 1.0)
    assert -0.3 < float(energy[0]) < 0.0  # off the training data: lowered, by less than A
    h = 1e-5
    for i, k in [(0, 0), (2, 1), (8, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        e_plus = float(latent_bias(model, _graph(model, [plus]), reference, 0.3, 1.0)[0][0])
        e_minus = float(latent_bias(model, _graph(model, [minus]), reference, 0.3, 1.0)[0][0])
        numeric = -(e_plus - e_minus) / (2 * h)
        assert float(forces[i, k]) == pytest.approx(numeric, rel=1e-4, abs=1e-8)


def test_bias_is_invariant_and_pulls_away_from_the_training_data(setup):
    model, reference = setup
    near, far = distorted_ethanol(1, 0.05, seed=11)[0], distorted_ethanol(1, 0.3, seed=12)[0]
    e = latent_bias(model, _graph(model, [near, far]), reference, 0.3, 1.0)[0]
    assert float(e[1]) < float(e[0]) <= 0.0  # lower where the environments are new
    moved = far.copy()
    moved.positions = moved.positions @ random_rotation(4).T + [0.3, -1.0, 2.0]
    moved = moved[[1, 0, 2, 5, 4, 3, 8, 7, 6]]  # permuted atoms
    e_moved = latent_bias(model, _graph(model, [moved]), reference, 0.3, 1.0)[0]
    assert float(e_moved[0]) == pytest.approx(float(e[1]), rel=1e-9)
    # a batch gives each structure what it gets alone
    alone = latent_bias(model, _graph(model, [far]), reference, 0.3, 1.0)[0]
    assert float(alone[0]) == pytest.approx(float(e[1]), rel=1e-12)


def test_the_calculator_adds_the_bias_and_refuses_it_without_a_latent_reference(tmp_path, setup):
    model, reference = setup
    plain = save_checkpoint(tmp_path / "plain.pt", model)
    with_latent = save_checkpoint(tmp_path / "latent.pt", model, latent=reference)
    atoms = distorted_ethanol(1, 0.2, seed=5)[0]
    base = MLForceCalculator(with_latent, uncertainty=False).predict([atoms])[0]
    calc = MLForceCalculator(with_latent, uncertainty=False, bias_strength=0.2)
    biased = calc.predict([atoms])[0]
    graph = _graph(model, [atoms])
    e_b, f_b = latent_bias(model, graph, reference, 0.2, 1.0)
    assert biased["energy"] == pytest.approx(base["energy"] + float(e_b[0]), abs=1e-9)
    assert np.allclose(biased["forces"], base["forces"] + f_b.numpy(), atol=1e-9)
    assert biased["bias_energy"] == pytest.approx(float(e_b[0]))
    with pytest.raises(ConfigError, match="latent bias needs"):
        MLForceCalculator(plain, uncertainty=False, bias_strength=0.2)
    with pytest.raises(ConfigError, match="bias_strength"):
        MLForceCalculator(with_latent, uncertainty=False, bias_strength=-1.0)


def test_md_bias_in_a_config_needs_the_latent_reference():
    ok = Config.model_validate(
        {"uncertainty": {"latent_atoms": 100}, "md": {"bias": {"strength": 0.3}}}
    )
    assert ok.md.bias.strength == 0.3 and ok.md.bias.width == 1.5
    with pytest.raises(ValueError, match=r"md\.bias needs"):
        Config.model_validate({"md": {"bias": {"strength": 0.3}}})
    with pytest.raises(ValueError, match=r"unknown|extra"):
        Config.model_validate(
            {"uncertainty": {"latent_atoms": 100}, "md": {"bias": {"strength": 0.3, "hight": 1}}}
        )


def test_md_bias_rounds_biases_only_the_first_rounds_walkers(tmp_path, setup):
    """md.bias.rounds: the campaign's walkers are biased in rounds 1..rounds, not after."""
    import shutil

    import yaml

    from mlforce.campaign import CONFIG, RunDir, _walker_setup

    model, reference = setup
    ckpt = save_checkpoint(tmp_path / "latent.pt", model, latent=reference)
    cfg = {"uncertainty": {"latent_atoms": 100}, "md": {"bias": {"strength": 0.3, "rounds": 2}}}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CONFIG).write_text(yaml.safe_dump(cfg))
    run = RunDir(tmp_path / "run")
    atoms = distorted_ethanol(1, 0.2, seed=5)[0]
    strengths, bias_energies = [], []
    for round_ in (1, 2, 3):
        run.round_dir(round_)
        shutil.copy(ckpt, run.checkpoint(round_))
        calc = _walker_setup(run, round_)[2]
        strengths.append(calc.bias_strength)
        bias_energies.append(calc.predict([atoms])[0].get("bias_energy", 0.0))
    assert strengths == [0.3, 0.3, 0.0]
    assert bias_energies[0] < 0.0 and bias_energies[1] < 0.0 and bias_energies[2] == 0.0
    with pytest.raises(ValueError, match="rounds"):
        Config.model_validate(
            {"uncertainty": {"latent_atoms": 100}, "md": {"bias": {"strength": 0.3, "rounds": 0}}}
        )


def test_per_structure_bias_strengths_bias_each_structure_as_alone(tmp_path, setup):
    """predict(bias_strengths=...): each structure gets its own A; 0 leaves it unbiased."""
    model, reference = setup
    ckpt = save_checkpoint(tmp_path / "latent.pt", model, latent=reference)
    a, b = distorted_ethanol(2, 0.2, seed=7)
    plain = MLForceCalculator(ckpt, uncertainty=False)
    biased = MLForceCalculator(ckpt, uncertainty=False, bias_strength=0.3)
    mixed = plain.predict([a, b], bias_strengths=[0.3, 0.0])
    assert mixed[0]["bias_energy"] < 0.0 and mixed[1]["bias_energy"] == 0.0
    assert mixed[0]["energy"] == pytest.approx(biased.predict([a])[0]["energy"], abs=1e-9)
    assert np.allclose(mixed[0]["forces"], biased.predict([a])[0]["forces"], atol=1e-9)
    assert mixed[1]["energy"] == pytest.approx(plain.predict([b])[0]["energy"], abs=1e-9)
    assert np.allclose(mixed[1]["forces"], plain.predict([b])[0]["forces"], atol=1e-9)
    with pytest.raises(ConfigError, match="one value >= 0 per structure"):
        plain.predict([a, b], bias_strengths=[0.3])


def test_md_bias_temperatures_bias_only_those_walkers(tmp_path, setup):
    """md.bias.temperatures: walkers at other temperatures run unbiased, one by one and in
    lock-step alike (same trajectories either way)."""
    from ase.io import read

    from mlforce.campaign import bias_strength
    from mlforce.config import MDConfig
    from mlforce.lockstep import run_walkers

    cfg = Config.model_validate(
        {"uncertainty": {"latent_atoms": 100},
         "md": {"temperatures": [300, 500, 700],
                "bias": {"strength": 0.3, "rounds": 1, "temperatures": [300, 500]}}}
    )  # fmt: skip
    assert [bias_strength(cfg, 1, t) for t in (300, 500, 700)] == [0.3, 0.3, 0.0]
    assert [bias_strength(cfg, 2, t) for t in (300, 500, 700)] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"not in md\.temperatures"):
        Config.model_validate(
            {"uncertainty": {"latent_atoms": 100},
             "md": {"temperatures": [300], "bias": {"strength": 0.3, "temperatures": [400]}}}
        )  # fmt: skip

    model, reference = setup
    ckpt = save_checkpoint(tmp_path / "latent.pt", model, latent=reference)
    md = MDConfig(steps=6, trajectory_every=2, timestep_fs=0.5)
    md.triggers.mode = "collect"
    md.triggers.upper = 1e9
    out = {}
    for lockstep in (False, True):
        calc = MLForceCalculator(ckpt, mc_samples=2, bias_strength=0.3)
        starts = [a.copy() for a in distorted_ethanol(2, 0.05, seed=9)]
        trajs = [tmp_path / f"{lockstep}_{i}.extxyz" for i in range(2)]
        run_walkers(calc, starts, [300.0, 700.0], md, [1, 2], lockstep=lockstep,
                    per_walker=[{"trajectory": t} for t in trajs],
                    bias_strengths=[0.3, 0.0])  # fmt: skip
        out[lockstep] = [read(t, ":") for t in trajs]
    for lockstep, (biased, plain) in out.items():
        assert all(f.info.get("bias_energy", 0.0) < 0.0 for f in biased[1:]), lockstep
        assert all(f.info.get("bias_energy", 0.0) == 0.0 for f in plain), lockstep
    for one, many in zip(out[False], out[True], strict=True):
        assert np.allclose(one[-1].positions, many[-1].positions, atol=1e-8)
