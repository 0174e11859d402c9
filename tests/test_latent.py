"""Distance to the training data in the model's learned features (mlforce.latent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlforce.data import graphs_from_frames
from mlforce.latent import LatentReference, atom_features
from tests.conftest import distorted_ethanol, make_model, random_rotation


@pytest.fixture(scope="module")
def model():
    return make_model(species=(1, 6, 8), features=16, cutoff=4.0)


def _features(model, frames):
    graphs = graphs_from_frames(frames, model.species, 4.0, torch.float64, with_labels=False)
    return atom_features(model, graphs)


def test_training_atoms_sit_at_zero_and_new_environments_far_away(model):
    train = distorted_ethanol(20, 0.05, seed=0)
    reference = LatentReference.build(
        _features(model, train), [a.numbers for a in train], max_per_element=None
    )
    for atoms, f in zip(train[:3], _features(model, train[:3])):
        assert np.allclose(reference.distance(f, atoms.numbers), 0.0, atol=1e-4)
    # the same structures rotated and shifted: the features are invariant, so still ~0
    moved = [a.copy() for a in train[:3]]
    for a in moved:
        a.positions = a.positions @ random_rotation(3).T + [1.0, -2.0, 0.5]
    for atoms, f in zip(moved, _features(model, moved)):
        assert reference.distance(f, atoms.numbers).max() < 1e-3
    near = distorted_ethanol(5, 0.05, seed=1)  # like the training data
    far = distorted_ethanol(5, 0.4, seed=2)  # strongly distorted
    d_near = [reference.distance(f, a.numbers).max() for a, f in zip(near, _features(model, near))]
    d_far = [reference.distance(f, a.numbers).max() for a, f in zip(far, _features(model, far))]
    assert max(d_near) < min(d_far)


def test_an_element_never_seen_is_infinitely_far(model):
    train = distorted_ethanol(4, 0.05, seed=0)
    hydrocarbons = [a[[i for i, z in enumerate(a.numbers) if z != 8]] for a in train]
    reference = LatentReference.build(
        _features(model, hydrocarbons), [a.numbers for a in hydrocarbons]
    )
    atoms = train[0]
    d = reference.distance(_features(model, [atoms])[0], atoms.numbers)
    assert np.isinf(d[atoms.numbers == 8]).all() and np.isfinite(d[atoms.numbers != 8]).all()


def test_subsampling_is_seeded_and_the_dict_roundtrip_keeps_distances(model):
    train = distorted_ethanol(20, 0.05, seed=0)
    features, numbers = _features(model, train), [a.numbers for a in train]
    a = LatentReference.build(features, numbers, max_per_element=15, seed=3)
    b = LatentReference.build(features, numbers, max_per_element=15, seed=3)
    assert {z: len(p) for z, p in a.points.items()} == {1: 15, 6: 15, 8: 15}  # O: 20 atoms
    assert all(np.array_equal(a.points[z], b.points[z]) for z in a.points)
    probe = distorted_ethanol(2, 0.2, seed=5)
    again = LatentReference.from_dict(a.to_dict())
    for atoms, f in zip(probe, _features(model, probe)):
        assert np.array_equal(a.distance(f, atoms.numbers), again.distance(f, atoms.numbers))
    with pytest.raises(ValueError, match="feature rows"):
        LatentReference.build(features, numbers[:-1])


def test_sigma_combined_with_the_latent_distance_from_training_to_calculator(tmp_path, xtb_frames):
    """uncertainty.latent_atoms: the checkpoint keeps the training atoms' features and every
    σ it reports is sqrt(σ_MC · d) per atom (then calibrated), in the calculator and evaluate."""
    from ase.io import write

    from mlforce.calculators.ml import MLForceCalculator
    from mlforce.checkpoint import load_checkpoint, save_checkpoint
    from mlforce.cli import run_evaluation
    from mlforce.config import Config
    from mlforce.graph import atoms_to_graph
    from mlforce.train import train_models

    config = Config.model_validate(
        {
            "device": "cpu",
            "model": {"features": 16, "blocks": 2, "radial_basis": 8, "cutoff": 4.5},
            "training": {"max_epochs": 3, "max_minutes": None, "batch_size": 8, "seed": 0},
            "uncertainty": {"mc_samples": 4, "latent_atoms": 40},
        }
    )
    train, val = xtb_frames[:60], xtb_frames[100:]
    result = train_models(train, val, config, log=lambda m: None)
    assert result.latent is not None
    assert {z: len(p) for z, p in result.latent.points.items()} == {1: 40, 6: 40, 8: 40}
    assert result.calibration["latent_atoms"] == 120
    path = save_checkpoint(
        tmp_path / "model.pt", result.models, result.calibration, latent=result.latent
    )
    ckpt = load_checkpoint(path)
    assert ckpt.latent is not None and ckpt.latent.n_points == 120

    atoms = xtb_frames[110].copy()
    combined = MLForceCalculator(path, calibrated=False).predict([atoms])[0]
    alone = load_checkpoint(path)
    alone.latent = None  # the same model, MC σ alone
    sigma = MLForceCalculator(alone, calibrated=False).predict([atoms])[0]["forces_std"]
    graph = atoms_to_graph(atoms, ckpt.species, ckpt.cutoff, torch.float32)
    d = ckpt.latent.distance(atom_features(ckpt.model, [graph])[0], atoms.numbers)
    assert np.all(d > 0) and not np.allclose(sigma, np.sqrt(sigma * d))
    np.testing.assert_allclose(combined["forces_std"], np.sqrt(sigma * d), rtol=1e-5)
    calibrated = MLForceCalculator(path).predict([atoms])[0]
    scale = result.calibration["scale"]
    np.testing.assert_allclose(calibrated["forces_std"], scale * combined["forces_std"], rtol=1e-6)

    data = tmp_path / "val.extxyz"
    write(data, val[:10], format="extxyz")
    metrics = run_evaluation(str(path), str(data), "auto")
    assert metrics["uncertainty"] == "mc_dropout T=4" and metrics["latent_atoms"] == 120
    assert {"force_mae", "spearman_max_force", "auroc_top10", "miscalibration_area"} <= set(metrics)


def test_large_data_can_switch_the_latent_distance_on_for_production_models():
    from mlforce.config import Config

    config = Config.model_validate({"model": {"large_data": {"frames": 100, "latent_atoms": 500}}})
    assert config.uncertainty.latent_atoms is None
    assert config.for_training_frames(99).uncertainty.latent_atoms is None
    assert config.for_training_frames(100).uncertainty.latent_atoms == 500


def test_a_damaged_latent_entry_is_a_clear_checkpoint_error(tmp_path, model):
    from mlforce.checkpoint import load_checkpoint, save_checkpoint
    from mlforce.errors import CheckpointError

    train = distorted_ethanol(4, 0.05, seed=0)
    reference = LatentReference.build(_features(model, train), [a.numbers for a in train])
    path = save_checkpoint(tmp_path / "model.pt", model, latent=reference)
    assert load_checkpoint(path).latent.n_points == reference.n_points
    payload = torch.load(path, weights_only=True)
    del payload["latent"]["points"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="damaged or incompatible"):
        load_checkpoint(path)
