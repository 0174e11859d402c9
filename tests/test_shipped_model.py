"""The shipped B3LYP ethanol model (data/models/ethanol_b3lyp.pt) loads and is what it says."""

from __future__ import annotations

import json

import numpy as np
from ase.io import read

from tests.conftest import ROOT

MODEL = ROOT / "data" / "models" / "ethanol_b3lyp.pt"
CHECK = ROOT / "data" / "models" / "ethanol_b3lyp_check.extxyz"  # B3LYP-labelled 300 K frames


def test_the_model_is_small_and_says_it_learned_b3lyp():
    from mlforce.checkpoint import load_checkpoint

    assert MODEL.stat().st_size < 2_000_000
    ckpt = load_checkpoint(MODEL)
    assert sorted(ckpt.species) == [1, 6, 8]
    config = str(ckpt.metadata["config"])  # the campaign's resolved config
    assert "'kind': 'pyscf'" in config and "B3LYP" in config and "def2-svp" in config


def test_the_calculator_reproduces_b3lyp_forces_on_held_out_frames():
    from mlforce.calculators.ml import MLForceCalculator

    frames = read(CHECK, ":")
    assert len(frames) >= 3
    calc = MLForceCalculator(str(MODEL), device="cpu")
    errors = []
    for atoms in frames:
        reference = atoms.get_forces()
        work = atoms.copy()
        work.calc = calc
        errors.append(np.abs(work.get_forces() - reference).mean())
        assert work.calc.results["max_force_std"] >= 0.0
    assert np.mean(errors) < 0.06  # eV/Å; docs/benchmarks.md §18 has the full score


def test_mlforce_evaluate_scores_the_shipped_model(capsys):
    from mlforce.cli import main

    assert main(["evaluate", str(MODEL), str(CHECK), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_configs"] == len(read(CHECK, ":")) and out["force_mae"] < 0.06
