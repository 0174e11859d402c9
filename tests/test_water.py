"""Liquid water in periodic boundary conditions through the whole loop (real Prefect, GFN1-xTB).

A 4-molecule box (12 atoms, 4.9 Å cell) keeps it fast: tblite's periodic GFN1-xTB takes ~0.05 s
a call. Checks that labels, models and σ keep the cell, and that the report's atom view names
the most uncertain molecule.
"""

from __future__ import annotations

import numpy as np

from mlforce.calculators.ml import MLForceCalculator
from mlforce.store import LabelStore
from mlforce.structures import water_box
from tests.conftest import ROOT

WATER = str(ROOT / "configs" / "water_xtb.yaml")


def test_a_small_periodic_water_box_runs_the_loop(prefect_harness, tmp_path):
    from ase.io import write

    from flows.active_learning import run_campaign
    from mlforce.report_html import build_report

    box = water_box(4, seed=1)
    write(tmp_path / "water_4.xyz", box, format="extxyz")
    small = {
        "md.structures": [str(tmp_path / "water_4.xyz")], "md.temperatures": [300],
        "md.steps": 60, "md.trajectory_every": 10, "md.triggers.check_every": 2,
        "md.triggers.min_gap": 4, "md.triggers.threshold": "absolute",
        "md.triggers.lower": 0.02, "md.triggers.upper": 50.0,
        "model.features": 16, "model.blocks": 2, "model.radial_basis": 8, "model.cutoff": 4.0,
        "training.max_epochs": 20, "training.max_minutes": None, "training.threads": 1,
        "uncertainty.mc_samples": 4, "device": "cpu",
        "active_learning.max_rounds": 1, "active_learning.labels_per_round": 4,
        "active_learning.round_epochs": 10, "active_learning.seed.frames": 6,
        "active_learning.seed.interval": 5, "runner.workers": 1,
    }  # fmt: skip
    state = run_campaign(WATER, str(tmp_path / "run"), **small)
    assert state["rounds_run"] == 1
    rows = LabelStore(tmp_path / "run" / "labels.db").rows(status="ok")
    assert sum(r["trigger"] == "seed" for r in rows) == 6
    assert any(r["trigger"] in ("uncertainty", "audit") for r in rows)
    frames = LabelStore(tmp_path / "run" / "labels.db").atoms(status="ok")
    for atoms in frames:  # every label keeps the periodic cell and the composition
        assert atoms.pbc.all() and np.allclose(atoms.cell[:], box.cell[:])
        assert atoms.get_chemical_formula() == "H8O4"
        assert np.isfinite(atoms.get_forces()).all()
    calc = MLForceCalculator(state["final_checkpoint"], device="cpu", mc_samples=4)
    liquid = frames[-1].copy()
    liquid.calc = calc
    forces = liquid.get_forces()
    sigma = calc.results["forces_std"]
    assert forces.shape == (12, 3) and sigma.shape == (12,) and (sigma > 0).all()
    shifted = frames[-1].copy()  # periodic: a whole-box translation changes nothing
    shifted.positions += [1.3, -2.1, 0.7]
    shifted.wrap()
    shifted.calc = calc
    assert np.allclose(shifted.get_forces(), forces, atol=1e-4)
    html = build_report(tmp_path / "run").read_text()
    assert "molecule" in html and "H2O" in html  # the atom view names the uncertain molecule
