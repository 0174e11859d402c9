"""Distance to the training data in the model's learned features (mlforce.latent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule

from mlforce.data import graphs_from_frames
from mlforce.latent import LatentReference, atom_features
from tests.conftest import make_model, random_rotation


def _frames(n: int, scale: float, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
        out.append(atoms)
    return out


@pytest.fixture(scope="module")
def model():
    return make_model(species=(1, 6, 8), features=16, cutoff=4.0)


def _features(model, frames):
    graphs = graphs_from_frames(frames, model.species, 4.0, torch.float64, with_labels=False)
    return atom_features(model, graphs)


def test_training_atoms_sit_at_zero_and_new_environments_far_away(model):
    train = _frames(20, 0.05, seed=0)
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
    near = _frames(5, 0.05, seed=1)  # like the training data
    far = _frames(5, 0.4, seed=2)  # strongly distorted
    d_near = [reference.distance(f, a.numbers).max() for a, f in zip(near, _features(model, near))]
    d_far = [reference.distance(f, a.numbers).max() for a, f in zip(far, _features(model, far))]
    assert max(d_near) < min(d_far)


def test_an_element_never_seen_is_infinitely_far(model):
    train = _frames(4, 0.05, seed=0)
    hydrocarbons = [a[[i for i, z in enumerate(a.numbers) if z != 8]] for a in train]
    reference = LatentReference.build(
        _features(model, hydrocarbons), [a.numbers for a in hydrocarbons]
    )
    atoms = train[0]
    d = reference.distance(_features(model, [atoms])[0], atoms.numbers)
    assert np.isinf(d[atoms.numbers == 8]).all() and np.isfinite(d[atoms.numbers != 8]).all()


def test_subsampling_is_seeded_and_the_dict_roundtrip_keeps_distances(model):
    train = _frames(20, 0.05, seed=0)
    features, numbers = _features(model, train), [a.numbers for a in train]
    a = LatentReference.build(features, numbers, max_per_element=15, seed=3)
    b = LatentReference.build(features, numbers, max_per_element=15, seed=3)
    assert {z: len(p) for z, p in a.points.items()} == {1: 15, 6: 15, 8: 15}  # O: 20 atoms
    assert all(np.array_equal(a.points[z], b.points[z]) for z in a.points)
    probe = _frames(2, 0.2, seed=5)
    again = LatentReference.from_dict(a.to_dict())
    for atoms, f in zip(probe, _features(model, probe)):
        assert np.array_equal(a.distance(f, atoms.numbers), again.distance(f, atoms.numbers))
    with pytest.raises(ValueError, match="feature rows"):
        LatentReference.build(features, numbers[:-1])
