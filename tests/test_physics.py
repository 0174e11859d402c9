"""Physics of the model, in float64: forces are -dE/dr, invariances, batching, cutoff, PBC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import make_supercell
from ase.calculators.fd import calculate_numerical_stress

from mlforce.forces import compute_forces
from mlforce.graph import atoms_to_graph, batch_graphs
from mlforce.nn.dropout import DropoutKeys
from tests.conftest import make_model, random_rotation


def energy(model, atoms, dropout=None) -> float:
    g = batch_graphs([atoms_to_graph(atoms, model.species, model.cutoff, torch.float64)])
    with torch.no_grad():
        return float(model(g, dropout=dropout)[0])


def forces(model, atoms, dropout=None) -> np.ndarray:
    g = batch_graphs([atoms_to_graph(atoms, model.species, model.cutoff, torch.float64)])
    return compute_forces(model, g, create_graph=False, dropout=dropout)["forces"].numpy()


@pytest.mark.parametrize("dropout_on", [False, True])
def test_forces_are_minus_energy_gradient(ethanol, dropout_on):
    model = make_model(node=0.2, edge=0.2)
    keys = DropoutKeys(torch.tensor([12345])) if dropout_on else None
    analytic = forces(model, ethanol, keys)
    eps = 1e-5
    numeric = np.zeros_like(analytic)
    for i in range(len(ethanol)):
        for k in range(3):
            plus, minus = ethanol.copy(), ethanol.copy()
            plus.positions[i, k] += eps
            minus.positions[i, k] -= eps
            numeric[i, k] = -(energy(model, plus, keys) - energy(model, minus, keys)) / (2 * eps)
    assert np.abs(analytic).max() > 1e-3  # a non-trivial field
    assert np.abs(analytic - numeric).max() <= 1e-6


def test_rotation_translation_permutation_invariance(ethanol):
    model = make_model()
    e0 = energy(model, ethanol)
    f0 = forces(model, ethanol)
    rot = random_rotation(3)
    moved = ethanol.copy()
    moved.positions = ethanol.positions @ rot.T + np.array([3.1, -2.0, 7.5])
    assert abs(energy(model, moved) - e0) <= 1e-8
    # forces rotate with the structure (equivariance follows from invariance of E)
    assert np.abs(forces(model, moved) - f0 @ rot.T).max() <= 1e-8
    perm = np.random.default_rng(1).permutation(len(ethanol))
    permuted = ethanol[perm]
    assert abs(energy(model, permuted) - e0) <= 1e-8
    assert np.abs(forces(model, permuted) - f0[perm]).max() <= 1e-8


def test_batched_equals_one_by_one(ethanol):
    model = make_model()
    others = [ethanol.copy() for _ in range(3)]
    for k, a in enumerate(others):
        a.rattle(0.05, seed=k)
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    structures = [*others, water]
    g = batch_graphs(
        [atoms_to_graph(a, model.species, model.cutoff, torch.float64) for a in structures]
    )
    out = compute_forces(model, g, create_graph=False)
    split = np.cumsum([len(a) for a in structures])[:-1]
    for a, e, f in zip(structures, out["energy"], np.split(out["forces"].numpy(), split)):
        assert abs(float(e) - energy(model, a)) <= 1e-10
        assert np.abs(f - forces(model, a)).max() <= 1e-10


def test_no_gradient_between_graphs_in_a_batch(ethanol):
    model = make_model(node=0.1, edge=0.1)
    other = ethanol.copy()
    other.rattle(0.1, seed=3)
    g = batch_graphs(
        [atoms_to_graph(a, model.species, model.cutoff, torch.float64) for a in (ethanol, other)]
    )
    pos = g.pos.clone().requires_grad_(True)
    for dropout in (None, DropoutKeys(torch.tensor([5, 9]))):
        e = model(g, positions=pos, dropout=dropout)
        (grad,) = torch.autograd.grad(e[0], pos)
        n0 = len(ethanol)
        assert grad[:n0].abs().max() > 0
        assert grad[n0:].abs().max() == 0


def test_smooth_at_cutoff():
    """A dimer pulled through the cutoff: energy and force approach their outside values."""
    model = make_model(species=(1, 8), cutoff=3.0)
    rc = model.cutoff

    def dimer(r):
        return Atoms("OH", positions=[[0, 0, 0], [r, 0, 0]])

    outside = energy(model, dimer(rc + 0.1))
    for delta in (1e-2, 1e-3):
        inside = dimer(rc - delta)
        f = forces(model, inside)
        assert abs(energy(model, inside) - outside) < 50 * delta**3
        assert np.abs(f).max() < 50 * delta**2
    assert np.abs(forces(model, dimer(rc + 1e-4))).max() == 0.0


def test_periodic_images_match_replicated_cell(copper):
    model = make_model(cutoff=4.5)
    prim = copper.copy()
    prim.rattle(0.02, seed=4)
    super_ = make_supercell(prim, np.diag([2, 2, 2]))
    e_prim, e_super = energy(model, prim), energy(model, super_)
    assert abs(e_super - 8 * e_prim) <= 1e-8
    g = batch_graphs([atoms_to_graph(super_, model.species, model.cutoff, torch.float64)])
    out = compute_forces(model, g, create_graph=False, compute_stress=True)
    gp = batch_graphs([atoms_to_graph(prim, model.species, model.cutoff, torch.float64)])
    outp = compute_forces(model, gp, create_graph=False, compute_stress=True)
    assert np.abs(out["stress"][0].numpy() - outp["stress"][0].numpy()).max() <= 1e-9


def test_stress_matches_finite_differences(copper):
    from ase.calculators.calculator import Calculator

    model = make_model(cutoff=4.5)
    atoms = make_supercell(copper, np.diag([2, 1, 1]))
    atoms.rattle(0.03, seed=5)
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + 0.01 * random_rotation(2)), scale_atoms=True)

    class EnergyOnly(Calculator):
        implemented_properties = ["energy", "free_energy"]

        def calculate(self, atoms=None, properties=None, system_changes=None):
            super().calculate(atoms, properties, system_changes)
            e = energy(model, self.atoms)
            self.results = {"energy": e, "free_energy": e}

    atoms.calc = EnergyOnly()
    numeric = calculate_numerical_stress(atoms, eps=1e-5, voigt=False)
    g = batch_graphs([atoms_to_graph(atoms, model.species, model.cutoff, torch.float64)])
    analytic = compute_forces(model, g, create_graph=False, compute_stress=True)["stress"][0]
    assert np.abs(numeric).max() > 1e-4
    assert np.abs(analytic.numpy() - numeric).max() <= 1e-7


def test_batch_graphs_matches_pyg_collation(ethanol, copper):
    from torch_geometric.data import Batch

    model = make_model(cutoff=4.5)
    graphs = [atoms_to_graph(a, model.species, model.cutoff) for a in (ethanol, copper, ethanol)]
    ours, pyg = batch_graphs(graphs), Batch.from_data_list(graphs)
    for key in ("pos", "species", "numbers", "local_atom", "edge_index", "cell_shift", "cell",
                "pbc", "batch"):  # fmt: skip
        assert torch.equal(getattr(ours, key), getattr(pyg, key)), key
    assert ours.num_graphs == pyg.num_graphs == 3
