"""Energy conservation: 1 ps of NVE (VelocityVerlet, 0.5 fs) with a trained model."""

from __future__ import annotations

import numpy as np
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from mlforce.calculators.ml import MLForceCalculator


def test_nve_energy_drift_below_1_mev_per_atom(trained_checkpoint, xtb_frames):
    atoms = xtb_frames[0].copy()
    atoms.calc = MLForceCalculator(trained_checkpoint, device="cpu", uncertainty=False)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    totals = []
    for _ in dyn.irun(2000):  # 1 ps
        totals.append(atoms.get_total_energy())
    totals = np.array(totals)
    n = len(atoms)
    # the model moved the atoms (not a frozen trajectory) ...
    assert atoms.get_kinetic_energy() > 0.01
    # ... and the total energy stayed put: drift (end vs start) and spread both < 1 meV/atom
    drift = abs(np.mean(totals[-100:]) - np.mean(totals[:100])) / n
    assert drift <= 1e-3, f"drift {drift * 1000:.3f} meV/atom"
    assert (totals.max() - totals.min()) / n <= 2e-3


def test_nve_conserves_the_biased_energy(tmp_path, trained_checkpoint, xtb_frames):
    """The latent bias (mlforce.bias) is a potential: model + bias energy is conserved too,
    and the bias is really acting (it lowers the energy along the whole run). Its force jumps
    where an atom's nearest training atom changes, so the step is 0.25 fs (at 0.5 fs a trained
    ethanol model drifts 3 meV/atom in 0.5 ps with A = 0.1 eV, docs/benchmarks.md 29)."""
    import torch

    from mlforce.checkpoint import load_checkpoint, save_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.latent import LatentReference, atom_features

    ckpt = load_checkpoint(trained_checkpoint)
    train = xtb_frames[:20]
    graphs = graphs_from_frames(train, ckpt.species, ckpt.cutoff, torch.float32, False)
    latent = LatentReference.build(atom_features(ckpt.model, graphs), [a.numbers for a in train])
    path = save_checkpoint(tmp_path / "latent.pt", ckpt.models, latent=latent)
    atoms = xtb_frames[110].copy()
    atoms.calc = MLForceCalculator(path, device="cpu", uncertainty=False, bias_strength=0.1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
    totals, bias = [], []
    for _ in dyn.irun(1000):
        totals.append(atoms.get_total_energy())
        bias.append(atoms.calc.results["bias_energy"])
    totals = np.array(totals)
    assert max(bias) < 0.0  # the bias acted at every step
    drift = abs(np.mean(totals[-100:]) - np.mean(totals[:100])) / len(atoms)
    assert drift <= 1e-3, f"drift {drift * 1000:.3f} meV/atom"
