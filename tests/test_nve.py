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
