"""The label ledger: hashing, dedupe, provenance, export, split, concurrency, crashes, `ase db`."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from mlforce.errors import StoreError
from mlforce.store import LabelStore, in_validation, structure_hash

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).parent / "helpers" / "store_writer.py"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _label(atoms, store, **provenance):
    n = len(atoms)
    forces = np.arange(3 * n, dtype=float).reshape(n, 3) * 0.1
    return store.add(atoms, energy=-1.5 * n, forces=forces, reference="emt", **provenance)


def _frames(n, seed=0):
    frames = []
    for k in range(n):
        atoms = molecule("H2O")
        atoms.rattle(0.05, seed=seed + k)
        frames.append(atoms)
    return frames


def test_structure_hash_is_pure_and_rounds_to_micro_angstrom():
    atoms = molecule("CH3CH2OH")
    before = atoms.positions.copy()
    h = structure_hash(atoms)
    assert h == structure_hash(atoms) and h.startswith("v1-") and len(h) == 35
    np.testing.assert_array_equal(atoms.positions, before)

    noisy = atoms.copy()
    noisy.positions += 1e-9
    noisy.calc = SinglePointCalculator(noisy, energy=1.0)
    noisy.info["walker"] = 3
    assert structure_hash(noisy) == h  # calculator and info are not part of the identity
    moved = atoms.copy()
    moved.positions[4, 2] += 1e-5
    assert structure_hash(moved) != h
    swapped = atoms.copy()
    swapped.numbers[[0, 2]] = swapped.numbers[[2, 0]]
    assert structure_hash(swapped) != h
    boxed = atoms.copy()
    boxed.cell = [10, 10, 10]
    assert structure_hash(boxed) != h
    periodic = boxed.copy()
    periodic.pbc = True
    assert structure_hash(periodic) != structure_hash(boxed)
    copper = bulk("Cu", cubic=True)
    assert structure_hash(copper) != structure_hash(bulk("Cu", cubic=True, a=3.7))


def test_add_dedupes_and_rows_carry_provenance(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    frames = _frames(3)
    ids = [
        _label(a, store, iteration=1, walker=k, trigger="uncertainty") for k, a in enumerate(frames)
    ]
    assert ids == [1, 2, 3] and len(store) == 3
    assert _label(frames[1].copy(), store, iteration=2) == 2  # already there: no new row
    assert len(store) == 3

    rows = store.rows()
    assert [r["id"] for r in rows] == [1, 2, 3]
    row = rows[1]
    assert row["walker"] == 1 and row["iteration"] == 1 and row["trigger"] == "uncertainty"
    assert row["status"] == "ok" and row["reference"] == "emt" and row["energy"] == -4.5
    assert row["structure_hash"] == structure_hash(frames[1]) and row["natoms"] == 3
    assert [r["id"] for r in store.rows(walker=2)] == [3]
    assert [r["id"] for r in store.rows("walker>0")] == [2, 3]

    atoms = store.atoms(id=2)[0]
    assert atoms.info["walker"] == 1 and atoms.info["id"] == 2
    np.testing.assert_allclose(atoms.get_forces(), np.arange(9.0).reshape(3, 3) * 0.1)
    assert atoms.get_potential_energy() == -4.5
    assert store.hashes()[structure_hash(frames[0])] == (1, "ok")


def test_energy_and_forces_from_attached_results_and_true_error(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    atoms = molecule("H2O")
    forces = np.array([[0.0, 0.0, 1.0], [0.0, 0.5, -0.5], [0.0, -0.5, -0.5]])
    atoms.calc = SinglePointCalculator(atoms, energy=-14.0, forces=forces)
    predicted = forces + np.array([[0.0, 0.3, 0.4], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    row = store.add(atoms, predicted_forces=predicted, reference="xtb", max_force_std=0.2)
    (stored,) = store.rows(id=row)
    assert stored["energy"] == -14.0
    assert stored["true_max_force_error"] == pytest.approx(0.5)  # |(0, 0.3, 0.4)|
    assert stored["max_force_std"] == 0.2


def test_failed_rows_keep_structure_and_error_and_ok_replaces_them(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    atoms = molecule("H2O")
    row = store.add(atoms, status="failed", error="SCF not converged", reference="xtb", walker=2)
    (failed,) = store.rows(status="failed")
    assert failed["id"] == row and failed["error"] == "SCF not converged"
    assert "energy" not in failed and "fmax" not in failed
    assert store.atoms(id=row)[0].calc is None
    assert len(store.atoms(status="failed")[0]) == 3
    assert store.add(atoms, status="failed", error="again") == row
    assert _label(atoms, store, walker=2) == row  # an ok label replaces the failed row
    (fixed,) = store.rows()
    assert fixed["status"] == "ok" and "error" not in fixed and len(store) == 1


@pytest.mark.parametrize(
    ("provenance", "message"),
    [
        ({"md_stpe": 3}, "provenance 'md_stpe': unknown key"),
        ({"structure_hash": "v1-x"}, "computed by the store"),
        ({"trigger": "bogus"}, "provenance 'trigger': 'bogus' is not one of"),
        ({"status": "maybe"}, "provenance 'status': 'maybe' is not one of"),
        ({"iteration": 1.5}, "provenance 'iteration': expected int"),
        ({"time_fs": "late"}, "provenance 'time_fs': expected float"),
        ({"threshold": float("nan")}, "provenance 'threshold': not a finite number"),
        ({"model_hash": "12345"}, "reads as a number"),
    ],
)
def test_bad_provenance_is_a_clear_error(tmp_path, provenance, message):
    store = LabelStore(tmp_path / "labels.db")
    with pytest.raises(StoreError, match=message):
        _label(molecule("H2O"), store, **provenance)
    assert len(store) == 0


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.db"
    path.write_text("not sqlite at all" * 100)
    with pytest.raises(StoreError, match=r"labels\.db: cannot open as a label ledger"):
        LabelStore(path)


def test_ok_labels_need_values_and_a_reference(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    with pytest.raises(StoreError, match="no reference energy/forces"):
        store.add(molecule("H2O"), reference="xtb")
    with pytest.raises(StoreError, match="provenance 'reference' is required"):
        store.add(molecule("H2O"), energy=1.0, forces=np.zeros((3, 3)))
    with pytest.raises(StoreError, match=r"shape \(3, 3\)"):
        store.add(molecule("H2O"), energy=1.0, forces=np.zeros((2, 3)), reference="xtb")


def test_extxyz_export_reads_back_as_calculator_results(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    frames = _frames(3)
    for k, atoms in enumerate(frames):
        _label(atoms, store, iteration=k, trigger="seed", time_fs=0.5 * k)
    store.add(_frames(1, seed=99)[0], status="failed", error="boom", reference="emt")
    assert store.to_extxyz(tmp_path / "ok.extxyz") == 3
    back = read(tmp_path / "ok.extxyz", ":")
    assert len(back) == 3
    np.testing.assert_allclose(back[2].positions, frames[2].positions, atol=1e-8)
    assert back[2].get_potential_energy() == -4.5
    np.testing.assert_allclose(back[2].get_forces(), np.arange(9.0).reshape(3, 3) * 0.1)
    assert back[2].info["iteration"] == 2 and back[2].info["trigger"] == "seed"
    assert store.to_extxyz(tmp_path / "all.extxyz", status=None) == 4


def test_split_depends_only_on_the_structure_hash(tmp_path):
    frames = _frames(60)
    first = LabelStore(tmp_path / "a.db")
    for atoms in frames[:30]:
        _label(atoms, first)
    _, val_small = first.split(0.3)
    for atoms in frames[30:]:
        _label(atoms, first)
    train, val = first.split(0.3)
    assert len(train) + len(val) == 60 and 5 <= len(val) <= 35
    val_hashes = {a.info["structure_hash"] for a in val}
    assert {a.info["structure_hash"] for a in val_small} <= val_hashes  # nobody changes side
    assert all(in_validation(h, 0.3) for h in val_hashes)

    other = LabelStore(tmp_path / "b.db")  # same structures, another order
    for atoms in reversed(frames):
        _label(atoms, other)
    assert {a.info["structure_hash"] for a in other.split(0.3)[1]} == val_hashes


def test_four_writers_at_once_lose_nothing_and_dedupe(tmp_path):
    db, go = tmp_path / "labels.db", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), str(db), str(w), "50", "10", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for w in range(4)
    ]
    time.sleep(0.5)
    go.touch()  # all four start writing at the same moment
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    store = LabelStore(db)
    assert len(store) == 210
    returned = {}
    for out, _ in outputs:
        for line in out.splitlines():
            row, x = line.split()
            returned.setdefault(float(x), set()).add(int(row))
    assert len(returned) == 210 and all(len(ids) == 1 for ids in returned.values())
    energies = {r["id"]: r["energy"] for r in store.rows()}
    assert {ids.pop(): -x for x, ids in returned.items()} == energies


def test_writer_killed_mid_write_leaves_every_finished_label(tmp_path):
    db = tmp_path / "labels.db"
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(db), "0", "100000", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    finished = {}
    for line in proc.stdout:
        row, x = line.split()
        finished[int(row)] = float(x)
        if len(finished) == 40:
            proc.send_signal(signal.SIGKILL)  # while it writes the next label
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = LabelStore(db)
    energies = {r["id"]: r["energy"] for r in store.rows()}
    assert len(store) >= 40
    assert all(energies[row] == -x for row, x in finished.items())
    _label(molecule("H2O"), store)  # still writable
    assert len(store) == len(energies) + 1


def test_ase_db_cli_lists_rows_with_provenance_columns(tmp_path):
    db = tmp_path / "labels.db"
    store = LabelStore(db)
    _label(molecule("H2O"), store, iteration=4, walker=1, trigger="uncertainty", max_force_std=0.31)
    store.add(molecule("NH3"), status="failed", error="timed out", reference="emt", iteration=4)

    def ase_db(*args):
        cmd = [sys.executable, "-m", "ase", "db", str(db), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    plain = ase_db()
    assert "Rows: 2" in plain and "H2O" in plain and "H3N" in plain
    keys = plain.split("Keys:")[1]
    for key in ("iteration", "walker", "trigger", "status", "reference", "structure_hash"):
        assert key in keys
    table = ase_db("-c", "++")
    header = table.splitlines()[0]
    for column in ("iteration", "walker", "trigger", "status", "max_force_std", "error"):
        assert column in header
    failed = ase_db("status=failed", "-c", "+error")
    assert "timed out" in failed and "Rows: 1" in failed
