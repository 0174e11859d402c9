"""The label ledger: every reference label with its provenance, in an ASE database on SQLite.

``ase db labels.db`` lists the rows (``-c ++`` adds every provenance column, e.g.
``ase db labels.db status=failed -c ++``); ``ase db labels.db -w`` browses them.

A row holds the structure (numbers, positions Å, cell Å, pbc), the reference ``energy`` (eV) and
``forces`` (n, 3) eV/Å for ``status=ok`` rows (none for ``failed`` rows, which keep the structure
and the ``error``), and the provenance as ASE key-value pairs (:data:`PROVENANCE_KEYS`).

Safety: every write runs in one ``BEGIN IMMEDIATE`` SQLite transaction (the check for a duplicate
and the insert are atomic across processes; others wait on SQLite's busy timeout), a UNIQUE
index on ``structure_hash`` backs the dedupe, and the default rollback journal with
``synchronous=FULL`` makes a label durable before :meth:`LabelStore.add` returns, so a writer
killed mid-write loses nothing that was already added.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import sqlite3
import threading
import uuid
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.db.core import str_represents
from ase.db.sqlite import SQLite3Database

from mlforce.errors import StoreError
from mlforce.keys import TRIGGERS

STATUSES = ("ok", "failed")

# Provenance key -> (type, description with unit). Keys given as None are omitted.
PROVENANCE_KEYS: dict[str, tuple[type, str]] = {
    "iteration": (int, "active-learning iteration"),
    "walker": (int, "MD walker index"),
    "md_step": (int, "MD step at which the structure was taken"),
    "time_fs": (float, "MD time (fs)"),
    "trigger": (str, f"why it was labelled: {', '.join(TRIGGERS)}"),
    "max_force_std": (float, "model's max per-atom force std (eV/Å), calibrated"),
    "max_force_std_raw": (float, "the same before calibration: the raw MC std (eV/Å)"),
    "trigger_max_force_std": (
        float,
        "the walker's max_force_std when it flagged the frame (eV/Å), which chose it; "
        "max_force_std is re-scored with uncertainty.label_samples masks",
    ),
    "threshold": (float, "uncertainty threshold in force (eV/Å)"),
    "model_hash": (str, "hash of the model that chose the structure"),
    "reference": (str, "reference method with its settings"),
    "reference_seconds": (float, "wall time of the reference, all attempts (s)"),
    "attempts": (int, "reference attempts made (1 + retries)"),
    "status": (str, "ok or failed"),
    "error": (str, "why the reference failed"),
}
# Computed by the store, never passed in.
COMPUTED_KEYS: dict[str, tuple[type, str]] = {
    "structure_hash": (str, "hash of species, pbc, cell and positions (1e-6 Å)"),
    "true_max_force_error": (float, "max per-atom |F_model - F_ref| (eV/Å)"),
}
# (structure_hash, id, status) of every row; ASE keeps text key-value pairs in this table.
_HASH_STATUS_SQL = (
    "SELECT h.value, h.id, s.value FROM text_key_values h LEFT JOIN text_key_values s "
    "ON s.id = h.id AND s.key = 'status' WHERE h.key = 'structure_hash'"
)
HASH_DECIMALS_A = 1e-6  # Å: positions and cell are rounded to this before hashing


def structure_hash(atoms: Atoms) -> str:
    """Identity of a structure: ``"v1-"`` + 32 hex digits.

    Hashes atomic numbers, pbc, and cell and positions rounded to 1e-6 Å; nothing else (not the
    charge, momenta or calculator). The ``v1-`` prefix names the scheme and keeps ASE from
    reading the value as a number.
    """
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(atoms.numbers, dtype="<i8").tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=bool).tobytes())
    for array in (atoms.cell.array, atoms.positions):
        digest.update(np.rint(np.asarray(array, float) / HASH_DECIMALS_A).astype("<i8").tobytes())
    return "v1-" + digest.hexdigest()


def in_validation(hash_: str, val_fraction: float) -> bool:
    """Deterministic split: True if the structure with this hash belongs to the validation set.

    Depends only on the hash, so a structure never changes side as the ledger grows.
    """
    return int(hash_.removeprefix("v1-")[:15], 16) / 16**15 < val_fraction


def split_frames(frames: list[Atoms], val_fraction: float) -> tuple[list[Atoms], list[Atoms]]:
    """``(train, validation)`` of ``frames`` by :func:`in_validation` on each structure hash
    (``info["structure_hash"]`` when present); the order of ``frames`` is kept."""
    train: list[Atoms] = []
    val: list[Atoms] = []
    for atoms in frames:
        h = atoms.info.get("structure_hash") or structure_hash(atoms)
        (val if in_validation(h, val_fraction) else train).append(atoms)
    return train, val


def validate_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """Check and convert provenance to ASE key-value pairs; None values are dropped.

    Raises StoreError naming the key: unknown key, wrong type, non-finite number, a trigger or
    status outside :data:`TRIGGERS`/:data:`STATUSES`.
    """
    out: dict[str, Any] = {}
    for key, value in provenance.items():
        if value is None:
            continue
        if key not in PROVENANCE_KEYS:
            hint = " (computed by the store)" if key in COMPUTED_KEYS else ""
            raise StoreError(
                f"provenance {key!r}: unknown key{hint}; known: {', '.join(PROVENANCE_KEYS)}"
            )
        kind = PROVENANCE_KEYS[key][0]
        if kind is str:
            ok = isinstance(value, str)
        else:
            ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            ok = ok and (kind is float or float(value).is_integer())
        if not ok:
            raise StoreError(f"provenance {key!r}: expected {kind.__name__}, got {value!r}")
        if kind is str:
            value = " ".join(value.split())[:2000]  # one line, bounded
            if any(str_represents(value, t) for t in (bool, int, float)):
                raise StoreError(f"provenance {key!r}: {value!r} reads as a number; ASE rejects it")
        else:
            value = kind(value)
            if not math.isfinite(value):
                raise StoreError(f"provenance {key!r}: not a finite number ({value!r})")
        out[key] = value
    if out.get("trigger", "manual") not in TRIGGERS:
        raise StoreError(f"provenance 'trigger': {out['trigger']!r} is not one of {TRIGGERS}")
    if out.get("status", "ok") not in STATUSES:
        raise StoreError(f"provenance 'status': {out['status']!r} is not one of {STATUSES}")
    return out


def _refuse_foreign_database(path: Path) -> None:
    """An existing SQLite file with tables of its own, not ASE's, is never written to."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
    except sqlite3.DatabaseError as err:
        raise StoreError(f"{path}: cannot open as a label ledger ({err})") from None
    if tables and "systems" not in tables:
        raise StoreError(
            f"{path}: an SQLite database of something else (tables: {', '.join(sorted(tables))}), "
            "not a label ledger; refusing to add tables to it"
        )


class _LedgerDatabase(SQLite3Database):
    """ASE's SQLite database whose connections start with ``BEGIN IMMEDIATE`` (the write lock)."""

    def __init__(self, filename: str, timeout_s: float) -> None:
        super().__init__(filename, create_indices=True, use_lock_file=False, serial=True)
        self.timeout_s = timeout_s

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.filename, timeout=self.timeout_s)
        con.execute("BEGIN IMMEDIATE")
        return con


class LabelStore:
    """The label ledger at ``path`` (an ASE SQLite database, created if missing).

    ``timeout_s``: how long a writer waits for another process's write lock (s).
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 600.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        _refuse_foreign_database(self.path)
        self._db = _LedgerDatabase(str(self.path), timeout_s)
        self._lock = threading.Lock()  # the ASE database object holds one connection at a time
        try:
            self._initialize()
        except (sqlite3.DatabaseError, OSError) as err:
            raise StoreError(f"{self.path}: cannot open as a label ledger ({err})") from None

    def _initialize(self) -> None:
        with self._lock, self._db as db:
            db.count()  # creates ASE's tables under the write lock: safe if several start at once
            if not db.connection.in_transaction:  # ASE committed its new tables: lock again
                db.connection.execute("BEGIN IMMEDIATE")
            db.connection.execute(
                "CREATE UNIQUE INDEX IF NOT EXISTS mlforce_structure_hash "
                "ON text_key_values(value) WHERE key = 'structure_hash'"
            )
            if not db.metadata:
                # title: shown by `ase db -w`; ledger_id: a new ledger at the same path is a
                # different ledger (the flow's label cache keys on it)
                db.metadata = {"title": "mlforce label ledger", "ledger_id": uuid.uuid4().hex}

    def _sql(self, query: str, params: tuple = ()) -> list[tuple]:
        """Read-only SQL on a plain connection (no write lock)."""
        with closing(sqlite3.connect(self.path, timeout=self.timeout_s)) as con:
            return con.execute(query, params).fetchall()

    @property
    def ledger_id(self) -> str:
        """Random id written when the ledger was created."""
        return str(self._reader().metadata.get("ledger_id", ""))

    def __len__(self) -> int:
        return self._sql("SELECT COUNT(*) FROM systems")[0][0]

    def hashes(self) -> dict[str, tuple[int, str]]:
        """Every stored structure: ``{structure_hash: (row id, status)}``."""
        return {h: (i, s or "ok") for h, i, s in self._sql(_HASH_STATUS_SQL)}

    def add(
        self,
        atoms: Atoms,
        *,
        energy: float | None = None,
        forces: np.ndarray | None = None,
        predicted_forces: np.ndarray | None = None,
        **provenance: Any,
    ) -> int:
        """Store one label; return its row id.

        ``energy`` (eV) and ``forces`` (n, 3) eV/Å: given explicitly, or else taken from
        ``atoms.calc.results`` (never computed here: pass explicit values if the attached
        calculator is not the reference). ``status="ok"`` (the default) needs both and a
        ``reference`` string; ``status="failed"`` stores the structure and ``error`` only.
        ``predicted_forces`` (n, 3) eV/Å, the model's forces, adds ``true_max_force_error``.
        ``provenance``: keys of :data:`PROVENANCE_KEYS`.

        A structure already present (same :func:`structure_hash`) adds no row: its id is
        returned, except that an ``ok`` label replaces a ``failed`` row in place (same id).
        """
        kvp = validate_provenance(provenance)
        status = kvp.setdefault("status", "ok")
        n = len(atoms)
        record = Atoms(
            numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc
        )
        if status == "ok":
            results = atoms.calc.results if atoms.calc is not None else {}
            energy = results.get("energy") if energy is None else energy
            forces = results.get("forces") if forces is None else forces
            if energy is None or forces is None:
                raise StoreError(
                    f"{atoms.get_chemical_formula()}: no reference energy/forces; pass energy= "
                    "and forces= (eV, eV/Å), or status='failed'"
                )
            forces = np.asarray(forces, dtype=float)
            if forces.shape != (n, 3) or not (np.isfinite(forces).all() and math.isfinite(energy)):
                raise StoreError(f"forces must be finite with shape ({n}, 3), got {forces.shape}")
            if "reference" not in kvp:
                raise StoreError("provenance 'reference' is required for ok labels (the method)")
            if predicted_forces is not None:
                predicted = np.asarray(predicted_forces, dtype=float)
                if predicted.shape != (n, 3):
                    raise StoreError(
                        f"predicted_forces must have shape ({n}, 3), got {predicted.shape}"
                    )
                kvp["true_max_force_error"] = float(
                    np.linalg.norm(predicted - forces, axis=1).max()
                )
            record.calc = SinglePointCalculator(record, energy=float(energy), forces=forces)
            record.calc.name = kvp["reference"].split()[0]  # shown in `ase db`'s calculator column
        kvp["structure_hash"] = structure_hash(atoms)
        with self._lock, self._db as db:  # one IMMEDIATE transaction: check + insert are atomic
            found = db.connection.execute(
                _HASH_STATUS_SQL + " AND h.value = ?", (kvp["structure_hash"],)
            ).fetchone()
            if found is None:
                return db.write(record, key_value_pairs=kvp)
            _, row_id, old_status = found
            if old_status == "failed" and status == "ok":
                db.write(record, key_value_pairs=kvp, id=row_id)
            return row_id

    def rows(self, selection: str | None = None, **filters: Any) -> list[dict[str, Any]]:
        """Rows as JSON-safe dicts, in id order, for tables and reports.

        Each dict: ``id``, ``formula``, ``natoms``, ``energy`` (eV) and ``fmax`` (max |F|, eV/Å)
        for ok rows, and the provenance keys present. ``selection`` is an ASE db query string
        (``"iteration>2"``); ``filters`` are equalities (``status="failed"``, ``iteration=3``).
        """
        out = []
        for row in self._reader().select(selection, sort="id", **filters):
            item = {"id": row.id, "formula": row.formula, "natoms": row.natoms}
            if row.get("energy") is not None:
                item["energy"] = float(row.energy)
            if row.get("forces") is not None:
                item["fmax"] = float(np.linalg.norm(row.forces, axis=1).max())
            item.update(row.key_value_pairs)
            out.append(item)
        return out

    def atoms(self, selection: str | None = None, **filters: Any) -> list[Atoms]:
        """Rows as Atoms: ``info`` holds ``id`` and the provenance; ok rows carry the reference
        ``energy`` (eV) and ``forces`` (n, 3) eV/Å as calculator results. Filters as in rows()."""
        out = []
        for row in self._reader().select(selection, sort="id", **filters):
            atoms = row.toatoms()
            atoms.info = {"id": row.id, **row.key_value_pairs}
            out.append(atoms)
        return out

    def to_extxyz(
        self, path: str | os.PathLike[str], status: str | None = "ok", **filters: Any
    ) -> int:
        """Write rows (default: ``status="ok"``; None: all) to extended XYZ; return how many.

        ``energy`` (eV) in info and ``forces`` (eV/Å) in arrays read back with ``ase.io.read``
        as calculator results; provenance is in info. Written to a temporary file, then renamed.
        """
        from ase.io import write

        frames = self.atoms(status=status, **filters) if status else self.atoms(**filters)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp, frames, format="extxyz")
        os.replace(tmp, path)
        return len(frames)

    def split(self, val_fraction: float, **filters: Any) -> tuple[list[Atoms], list[Atoms]]:
        """``(train, validation)`` ok labels; membership depends only on the structure hash.

        Both lists are in structure-hash order, not in the order rows were written: labels
        written by parallel workers in any order give the same training input.
        """
        if not 0 <= val_fraction < 1:
            raise StoreError(f"val_fraction must be in [0, 1), got {val_fraction}")
        rows = self.atoms(status="ok", **filters)
        return split_frames(sorted(rows, key=lambda a: a.info["structure_hash"]), val_fraction)

    def _reader(self) -> SQLite3Database:
        return SQLite3Database(str(self.path), use_lock_file=False, serial=True)
