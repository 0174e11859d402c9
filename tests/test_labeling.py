"""Labelling: real references, failures become rows, retries with fallback, skips, provenance."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from tblite.ase import TBLite

from mlforce.config import ReferenceConfig
from mlforce.errors import ConfigError, StoreError
from mlforce.labeling import label
from mlforce.store import LabelStore

sys.path.insert(0, str(Path(__file__).parent / "helpers"))  # mlforce_test_calcs
FLAKY = "mlforce_test_calcs:FlakyEMT"


def _copper(n, seed=0):
    """n rattled Cu fcc cells; the first atom's x is spread over about [-0.15, 0.15] Å."""
    frames = []
    for k in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.rattle(0.05, seed=seed + k)
        atoms.positions[0, 0] = -0.15 + 0.3 * k / max(n - 1, 1)
        frames.append(atoms)
    return frames


def _ethanols(n):
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.03, seed=k)
        frames.append(atoms)
    return frames


def test_xtb_labels_agree_with_tblite_and_carry_provenance(tmp_path):
    frames = _ethanols(3)
    store = LabelStore(tmp_path / "labels.db")
    provenance = [
        {"iteration": 2, "walker": k, "md_step": 10 * k, "trigger": "uncertainty"} for k in range(3)
    ]
    predicted = [np.zeros((9, 3)), None, None]
    summary = label(frames, ReferenceConfig(), store, provenance, predicted)
    assert (summary.ok, summary.failed, summary.skipped, summary.retries) == (3, 0, 0, 0)
    assert summary.ids == [1, 2, 3] and summary.reference_seconds > 0
    json.dumps(summary.to_dict())

    for atoms, row, stored in zip(frames, store.rows(), store.atoms(), strict=True):
        direct = atoms.copy()
        direct.calc = TBLite(method="GFN2-xTB", verbosity=0)
        assert row["energy"] == pytest.approx(direct.get_potential_energy(), abs=1e-8)
        np.testing.assert_allclose(stored.get_forces(), direct.get_forces(), atol=1e-8)
        assert row["reference"].startswith("xtb GFN2-xTB charge=0 multiplicity=1")
        assert row["status"] == "ok" and row["attempts"] == 1 and row["reference_seconds"] > 0
    rows = store.rows()
    assert [r["walker"] for r in rows] == [0, 1, 2] and rows[2]["md_step"] == 20
    assert rows[0]["true_max_force_error"] == pytest.approx(rows[0]["fmax"])
    assert "true_max_force_error" not in rows[1]


def test_failing_frames_become_failed_rows_and_the_rest_are_labelled(tmp_path):
    frames = _copper(8)  # FlakyEMT raises where the first atom's x > 0
    cfg = {"kind": "ase", "calculator": FLAKY, "kwargs": {"x_above": 0.0}, "retries": 2}
    store = LabelStore(tmp_path / "labels.db")
    summary = label(frames, cfg, store, {"iteration": 0, "trigger": "seed"})
    assert (summary.ok, summary.failed, summary.retries) == (4, 4, 8)
    for atoms, row in zip(frames, store.rows(), strict=True):
        if atoms.positions[0, 0] > 0:
            assert row["status"] == "failed" and row["attempts"] == 3
            assert row["error"].startswith("3 attempt(s) failed: RuntimeError: synthetic failure")
            assert "energy" not in row
        else:
            assert row["status"] == "ok" and "error" not in row and row["attempts"] == 1


def test_fallback_settings_rescue_a_failure_on_retry(tmp_path):
    cfg = ReferenceConfig(max_iterations=1, retries=1, fallback={"max_iterations": 250})
    store = LabelStore(tmp_path / "labels.db")
    summary = label(_ethanols(2), cfg, store)
    assert (summary.ok, summary.failed, summary.retries) == (2, 0, 2)
    row = store.rows()[0]
    assert row["attempts"] == 2 and "max_iterations=250" in row["reference"]

    no_fallback = ReferenceConfig(max_iterations=1, retries=1)
    summary = label(_ethanols(3), no_fallback, LabelStore(tmp_path / "b.db"))
    assert (summary.ok, summary.failed, summary.retries) == (0, 3, 3)
    failed = LabelStore(tmp_path / "b.db").rows(status="failed")
    assert all("SCF not converged in 1 cycles" in r["error"] for r in failed)


def test_nan_and_timeout_become_failures_without_stopping_the_others(tmp_path):
    frames = _copper(4)
    nan = {"kind": "ase", "calculator": FLAKY, "kwargs": {"mode": "nan", "x_above": 0.0}}
    summary = label(frames, nan, tmp_path / "nan.db")
    assert (summary.ok, summary.failed) == (2, 2)
    assert "non-finite" in LabelStore(tmp_path / "nan.db").rows(status="failed")[0]["error"]

    sleepy = {
        "kind": "ase",
        "calculator": FLAKY,
        "kwargs": {"mode": "sleep", "x_above": 0.1, "sleep_s": 60},
        "timeout_s": 1.5,
        "retries": 0,
    }
    summary = label(frames, sleepy, tmp_path / "sleep.db")
    assert (summary.ok, summary.failed) == (3, 1)
    (failed,) = LabelStore(tmp_path / "sleep.db").rows(status="failed")
    assert "timed out after 1.5 s (reference.timeout_s)" in failed["error"]


def test_frames_in_the_store_are_skipped_and_failed_ones_can_be_retried(tmp_path):
    frames = _copper(6)
    store = LabelStore(tmp_path / "labels.db")
    raising = {"kind": "ase", "calculator": FLAKY, "kwargs": {"x_above": 0.0}, "retries": 0}
    first = label(frames, raising, store)
    assert (first.ok, first.failed) == (3, 3)

    # Everything raises now: frames already stored (ok or failed) must not be recomputed.
    always = {"kind": "ase", "calculator": FLAKY, "retries": 0}
    again = label([*frames, frames[0].copy()], always, store)
    assert (again.ok, again.failed, again.skipped, again.reference_seconds) == (0, 0, 7, 0.0)
    assert again.ids == [*first.ids, first.ids[0]]

    retried = label(frames, {"kind": "emt"}, store, retry_failed=True)
    assert (retried.ok, retried.failed, retried.skipped) == (3, 0, 3)
    assert retried.ids == first.ids  # failed rows were replaced in place
    assert len(store) == 6 and not store.rows(status="failed")


def test_bad_settings_and_provenance_fail_before_any_reference_call(tmp_path):
    db = tmp_path / "labels.db"
    with pytest.raises(ConfigError, match=r"reference\.calculator: required"):
        label(_copper(1), {"kind": "ase"}, db)
    with pytest.raises(ConfigError, match=r"reference\.calculator: cannot import"):
        label(_copper(1), {"kind": "ase", "calculator": "nowhere.Calc"}, db)
    with pytest.raises(ConfigError, match=r"periodic cells are not supported \(frame 0"):
        label(_copper(1), {"kind": "pyscf"}, db)
    with pytest.raises(StoreError, match="provenance 'trigger'"):
        label(_copper(1), {"kind": "emt"}, db, {"trigger": "whim"})
    with pytest.raises(ValueError, match="provenance: 1 entries for 2 frames"):
        label(_copper(2), {"kind": "emt"}, db, [{}])
    assert len(LabelStore(db)) == 0
