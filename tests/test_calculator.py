"""The ASE calculator: forces, batched MC-dropout uncertainty, walkers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import molecule
from ase.calculators.fd import calculate_numerical_forces
from ase.calculators.test import gradient_test
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from mlforce.calculators.ml import MLForceCalculator
from mlforce.checkpoint import save_checkpoint
from mlforce.errors import CheckpointError, ConfigError, StructureError
from mlforce.forces import compute_forces
from mlforce.graph import atoms_to_graph, batch_graphs
from mlforce.nn.dropout import DropoutKeys
from mlforce.uncertainty import mc_predict
from tests.conftest import make_model


@pytest.fixture
def dropout_ckpt(tmp_path):
    model = make_model(node=0.15, edge=0.15, readout=0.1, cutoff=4.5)
    return save_checkpoint(tmp_path / "m", model, calibration={"method": "scale", "scale": 1.7})


def test_forces_match_finite_differences(dropout_ckpt, ethanol):
    ethanol.calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=4)
    analytic, _ = gradient_test(ethanol)
    numeric = calculate_numerical_forces(ethanol, eps=1e-5)
    assert np.abs(analytic).max() > 1e-3
    assert np.abs(analytic - numeric).max() <= 1e-6
    # the MC mean option is a conservative field too (fixed masks)
    ethanol.calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=4, prediction="mc_mean")
    mean = ethanol.get_forces()
    assert np.abs(mean - calculate_numerical_forces(ethanol, eps=1e-5)).max() <= 1e-6
    assert np.abs(mean - analytic).max() > 1e-6


def test_a_posterior_sample_drives_md_as_a_conservative_field(dropout_ckpt, ethanol, tmp_path):
    calc = MLForceCalculator(
        dropout_ckpt, device="cpu", mc_samples=4, prediction="sample", sample_index=2
    )
    ethanol.calc = calc
    forces = ethanol.get_forces()
    mc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=4).predict([ethanol])[0]
    assert np.allclose(forces, mc["forces_samples"][2], atol=1e-10)  # MC copy 2's mask
    assert np.abs(forces - mc["forces"]).max() > 1e-3  # not the dropout-free model
    assert np.allclose(calc.results["point_forces"], mc["forces"], atol=1e-10)  # recorded
    assert np.abs(forces - calculate_numerical_forces(ethanol, eps=1e-5)).max() <= 1e-6
    calc.uncertainty = False  # between checks: one stochastic pass, the same mask
    assert np.allclose(calc.predict([ethanol])[0]["forces"], forces, atol=1e-10)
    two = calc.predict([ethanol, ethanol.copy()], [6, 1])  # 6 = 2 mod 4
    assert np.allclose(two[0]["forces"], forces, atol=1e-10)
    assert np.allclose(two[1]["forces"], mc["forces_samples"][1], atol=1e-10)
    # a committee: member k
    members = [make_model(cutoff=4.5, seed=s) for s in (0, 1, 2)]
    committee = save_checkpoint(tmp_path / "c", members)
    calc = MLForceCalculator(committee, device="cpu", prediction="sample", sample_index=4)
    out = calc.predict([ethanol])[0]
    graph = batch_graphs([atoms_to_graph(ethanol, members[1].species, 4.5, torch.float64)])
    member = compute_forces(members[1], graph, create_graph=False)["forces"].numpy()
    assert np.allclose(out["forces"], member, atol=1e-6)
    with pytest.raises(ConfigError, match="dropout model or a committee"):
        MLForceCalculator(save_checkpoint(tmp_path / "d", members[0]), prediction="sample")


def test_local_radius_gives_the_sigma_of_the_worst_neighbourhood(tmp_path, ethanol):
    from ase.build import bulk

    from mlforce.uncertainty import predict_dataset

    model = make_model(node=0.15, edge=0.15, cutoff=4.5)
    cal = {"method": "robust", "scale": 1.7, "mc_samples": 8}
    plain = MLForceCalculator(save_checkpoint(tmp_path / "a", model, cal), device="cpu")
    local = MLForceCalculator(
        save_checkpoint(tmp_path / "b", model, {**cal, "local_radius": 3.0}), device="cpu"
    )
    assert local.checkpoint.local_radius == 3.0 and plain.checkpoint.local_radius is None
    override = MLForceCalculator(plain.checkpoint, device="cpu", local_radius=3.0)
    off = MLForceCalculator(local.checkpoint, device="cpu", local_radius=0)
    assert override.predict([ethanol])[0]["max_force_std"] == pytest.approx(
        local.predict([ethanol])[0]["max_force_std"], rel=1e-12
    )
    assert off.predict([ethanol])[0]["max_force_std"] == pytest.approx(
        plain.predict([ethanol])[0]["max_force_std"], rel=1e-12
    )
    with pytest.raises(ConfigError, match="exceeds the model cutoff"):
        MLForceCalculator(plain.checkpoint, device="cpu", local_radius=6.0)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True) * (2, 2, 2)  # 7.2 Å: one image per neighbour
    copper.rattle(0.1, seed=1)
    for atoms in (ethanol, copper):
        a, b = plain.predict([atoms])[0], local.predict([atoms])[0]
        assert np.allclose(a["forces_std"], b["forces_std"])  # per atom: unchanged
        assert a["max_force_std"] == pytest.approx(a["forces_std"].max())
        d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        near = (d < 3.0).astype(float)  # each atom and its neighbours closer than 3 Å
        expected = (near @ a["forces_std"] / near.sum(1)).max()
        assert b["max_force_std"] == pytest.approx(expected, rel=1e-9)
        assert b["max_force_std"] < a["max_force_std"]
        assert b["max_force_std_raw"] == pytest.approx(expected / 1.7, rel=1e-9)
    # whole data sets (evaluate, re-scored labels) agree with the calculator
    graphs = [atoms_to_graph(x, model.species, 4.5, torch.float64) for x in (ethanol, ethanol)]
    pred = predict_dataset([local.checkpoint.model], graphs, 8, 0, local_radius=3.0)
    one = local.predict([ethanol])[0]["max_force_std"]
    assert np.allclose(pred.max_force_std(local.checkpoint.calibration), one, rtol=1e-9)


def test_every_property_in_one_call(dropout_ckpt, ethanol):
    calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=8)
    ethanol.calc = calc
    ethanol.get_forces()
    for key in ("energy", "forces", "energy_std", "forces_std", "max_force_std"):
        assert key in calc.results and key in calc.implemented_properties
    assert calc.results["forces_std"].shape == (len(ethanol),)
    assert calc.results["max_force_std"] == pytest.approx(calc.results["forces_std"].max())
    assert calc.results["max_force_std"] > 0


def test_std_is_numpy_std_of_the_samples_and_calibrated(dropout_ckpt, ethanol):
    raw = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=6, calibrated=False)
    cal = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=6)
    r = raw.predict([ethanol])[0]
    samples = r["forces_samples"]
    assert samples.shape == (6, len(ethanol), 3)
    expected = np.linalg.norm(np.std(samples, axis=0), axis=1)
    assert np.allclose(r["forces_std"], expected, atol=1e-12)
    assert r["energy_std"] == pytest.approx(np.std(r["energy_samples"]), abs=1e-12)
    c = cal.predict([ethanol])[0]
    assert np.allclose(c["forces_std"], 1.7 * expected, atol=1e-12)
    assert c["max_force_std_raw"] == pytest.approx(r["max_force_std"])


def test_zero_dropout_gives_zero_std(tmp_path, ethanol):
    path = save_checkpoint(tmp_path / "m", make_model(node=0.0, edge=0.0))
    r = MLForceCalculator(path, device="cpu", mc_samples=4).predict([ethanol])[0]
    assert np.all(r["forces_std"] == 0.0) and r["max_force_std"] == 0.0


def test_default_samples_are_the_ones_the_calibration_was_fitted_with(tmp_path, ethanol):
    model = make_model(node=0.15, edge=0.15, cutoff=4.5)
    fitted = save_checkpoint(
        tmp_path / "a", model, calibration={"method": "scale", "scale": 1.0, "mc_samples": 5}
    )
    calc = MLForceCalculator(fitted, device="cpu")
    assert calc.mc_samples == 5
    assert calc.predict([ethanol])[0]["forces_samples"].shape == (5, len(ethanol), 3)
    older = save_checkpoint(tmp_path / "b", model, calibration={"method": "scale", "scale": 1.0})
    assert MLForceCalculator(older, device="cpu").mc_samples == 16
    assert MLForceCalculator(fitted, device="cpu", mc_samples=3).mc_samples == 3


def test_same_seed_same_uncertainty(dropout_ckpt, ethanol):
    a = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=8, seed=3).predict([ethanol])
    b = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=8, seed=3).predict([ethanol])
    c = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=8, seed=4).predict([ethanol])
    assert np.array_equal(a[0]["forces_std"], b[0]["forces_std"])
    assert not np.allclose(a[0]["forces_std"], c[0]["forces_std"])


def test_batched_mc_equals_looped_mc(ethanol):
    model = make_model(node=0.2, edge=0.2, readout=0.1)
    g = batch_graphs([atoms_to_graph(ethanol, model.species, model.cutoff, torch.float64)])
    pred = mc_predict(model, g, n_samples=5, seed=11)
    keys = DropoutKeys.for_samples(11, 5, 1).graph_keys
    for t in range(5):
        out = compute_forces(model, g, create_graph=False, dropout=DropoutKeys(keys[t : t + 1]))
        assert torch.allclose(pred.forces_samples[t], out["forces"], atol=1e-12, rtol=0)
        assert torch.allclose(pred.energy_samples[t], out["energy"], atol=1e-10, rtol=0)
    det = compute_forces(model, g, create_graph=False)
    assert torch.allclose(pred.forces, det["forces"], atol=1e-12, rtol=0)


def test_walkers_batched_equal_one_by_one(dropout_ckpt, ethanol):
    calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=8)
    walkers = [ethanol.copy() for _ in range(3)] + [molecule("H2O")]
    for k, w in enumerate(walkers):
        w.rattle(0.05, seed=k)
    together = calc.predict(walkers)
    for w, r in zip(walkers, together):
        alone = calc.predict([w])[0]
        for key in ("forces", "forces_std"):
            assert np.allclose(r[key], alone[key], atol=1e-10, rtol=0)
        for key in ("energy", "max_force_std", "energy_std"):
            assert r[key] == pytest.approx(alone[key], abs=1e-9)


def test_periodic_stress_dynamics_and_optimizer(dropout_ckpt, copper):
    atoms = copper.repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    atoms.calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=4)
    assert atoms.get_stress().shape == (6,)
    dyn = Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02 / units.fs,
                   rng=np.random.default_rng(0), fixcm=False)  # fmt: skip
    dyn.run(5)
    assert np.isfinite(atoms.calc.results["max_force_std"])
    mol = molecule("CH3CH2OH")
    mol.calc = MLForceCalculator(dropout_ckpt, device="cpu", uncertainty=False)
    f0 = np.abs(mol.get_forces()).max()
    BFGS(mol, logfile=None).run(fmax=1e-3, steps=20)
    assert np.abs(mol.get_forces()).max() < f0


def test_bad_input(dropout_ckpt, tmp_path):
    calc = MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=4)
    with pytest.raises(StructureError, match="element Cl"):
        calc.predict([molecule("CH3Cl")])
    with pytest.raises(ConfigError, match="mc_samples >= 2"):
        MLForceCalculator(dropout_ckpt, device="cpu", mc_samples=1)
    payload = torch.load(dropout_ckpt, weights_only=True)
    payload["format_version"] = 0
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="incompatible"):
        MLForceCalculator(tmp_path / "old.pt")


def test_evaluate_cli_reports_uncertainty_quality(trained_checkpoint, xtb_frames, tmp_path, capsys):
    import json

    from ase.io import write

    from mlforce.cli import main

    data = tmp_path / "test.extxyz"
    write(data, xtb_frames[100:], format="extxyz")
    assert (
        main(["evaluate", str(trained_checkpoint), str(data), "--mc-samples", "4", "--json"]) == 0
    )
    metrics = json.loads(capsys.readouterr().out)
    for key in ("spearman_max_force", "auroc_top10", "miscalibration_area", "force_mae",
                "n_configs", "energy_mae_per_atom", "force_rmse"):  # fmt: skip
        assert key in metrics, key
    assert -1 <= metrics["spearman_max_force"] <= 1 and 0 <= metrics["auroc_top10"] <= 1
    assert 0 <= metrics["miscalibration_area"] <= 0.5 and metrics["n_configs"] == 20
    assert main(["evaluate", str(trained_checkpoint), str(data), "--mc-samples", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    # σ of the worst 3 Å neighbourhood: smaller than the worst atom's, scored the same way
    args = ["evaluate", str(trained_checkpoint), str(data), "--mc-samples", "4", "--json"]
    assert main([*args, "--local-radius", "3.0"]) == 0
    local = json.loads(capsys.readouterr().out)
    assert local["local_radius"] == 3.0 and metrics["local_radius"] is None
    assert local["force_mae"] == metrics["force_mae"]
    assert 0 < local["mean_max_force_std"] < metrics["mean_max_force_std"]
    assert main([*args, "--local-radius", "9"]) == 2
    assert "exceeds the model cutoff" in capsys.readouterr().err
