"""Label structures with the reference and record every outcome in the ledger.

:func:`label` runs the reference on each frame not yet in the store, with retries (the retries
use ``reference.fallback`` settings), and stores an ``ok`` label or a ``failed`` row with the
error. One failure never stops the others; only bad settings (ConfigError) or bad provenance
(StoreError) raise, and they do so before any reference call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mlforce.calculators.reference import (
    ReferenceResult,
    as_reference_config,
    compute_reference,
    reference_description,
    validate_reference,
    with_fallback,
)
from mlforce.config import ReferenceConfig
from mlforce.errors import ConfigError, ReferenceFailure
from mlforce.store import LabelStore, structure_hash, validate_provenance


@dataclass
class LabelSummary:
    """Outcome of one :func:`label` call.

    ok/failed/skipped: frame counts (skipped: already in the store, not recomputed);
    retries: extra attempts used over all frames; reference_seconds: wall time spent in the
    reference (s); ids: the ledger row id of every frame, in input order.
    """

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    retries: int = 0
    reference_seconds: float = 0.0
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of the fields."""
        return asdict(self)


@dataclass
class Attempts:
    """Result of :func:`run_with_retries`: ``result`` or ``error``, never both."""

    result: ReferenceResult | None
    error: str | None
    attempts: int
    seconds: float
    reference: str


def run_with_retries(atoms: Atoms, cfg: ReferenceConfig) -> Attempts:
    """The reference on ``atoms``: first with ``cfg``, then ``cfg.retries`` more times with the
    fallback settings. Never raises for a failing structure; the error lists each distinct
    reason."""
    settings = [cfg] + [with_fallback(cfg)] * cfg.retries
    errors: list[str] = []
    seconds = 0.0
    for attempt in settings:
        start = time.perf_counter()
        try:
            result = compute_reference(atoms, attempt)
        except (ReferenceFailure, ConfigError) as err:
            seconds += time.perf_counter() - start
            errors.append(str(err))
            continue
        seconds += result.seconds
        return Attempts(result, None, len(errors) + 1, seconds, result.reference)
    error = f"{len(settings)} attempt(s) failed: " + " | ".join(dict.fromkeys(errors))
    try:
        reference = reference_description(settings[-1], atoms)
    except ConfigError:
        reference = reference_description(settings[-1])
    return Attempts(None, error, len(settings), seconds, reference)


class RetryingReference(Calculator):
    """The reference as an ASE calculator whose every call goes through
    :func:`run_with_retries`: transient failures are retried (with the fallback settings) as
    for labels; a call that fails every attempt raises :class:`ReferenceFailure`.
    For reference MD (the campaign's seed), where one failed step must not end the run."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, cfg: ReferenceConfig | Mapping[str, Any]) -> None:
        super().__init__()
        self.cfg = as_reference_config(cfg)
        self.retries_used = 0
        self.seconds = 0.0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        outcome = run_with_retries(self.atoms, self.cfg)
        self.retries_used += outcome.attempts - 1
        self.seconds += outcome.seconds
        if outcome.result is None:
            raise ReferenceFailure(outcome.error or "reference failed")
        self.results = {"energy": outcome.result.energy, "forces": outcome.result.forces}


def _per_frame(value: Any, n: int, name: str, single: type | tuple = ()) -> list[Any]:
    """``value`` once per frame: None or a ``single`` instance repeated, or a list of n."""
    if value is None or isinstance(value, single):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} entries for {n} frames")
    return values


def _progress(enabled: bool | None) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    disable = not console.is_terminal if enabled is None else not enabled
    return Progress(
        TextColumn("labelling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        disable=disable,
    )


def label(
    frames: Iterable[Atoms],
    reference_config: ReferenceConfig | Mapping[str, Any],
    store: LabelStore | str | os.PathLike[str],
    provenance: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    predicted_forces: Sequence[np.ndarray | None] | None = None,
    *,
    retry_failed: bool = False,
    progress: bool | None = None,
) -> LabelSummary:
    """Label ``frames`` with the reference and add them to ``store``.

    ``provenance``: one dict for all frames or one per frame (keys of
    ``mlforce.store.PROVENANCE_KEYS``; ``reference``, ``reference_seconds``, ``attempts``,
    ``status`` and ``error`` are set here). ``predicted_forces``: per frame, the model's forces
    (n, 3) eV/Å or None, for ``true_max_force_error``. Frames already in the store (by structure
    hash) are skipped, failed ones too unless ``retry_failed``. ``progress``: show a progress
    bar (None: only on a terminal).
    """
    cfg = validate_reference(reference_config)
    frames = list(frames)
    n = len(frames)
    provs = [validate_provenance(p or {}) for p in _per_frame(provenance, n, "provenance", Mapping)]
    preds = _per_frame(predicted_forces, n, "predicted_forces")
    if cfg.kind == "pyscf":
        for i, atoms in enumerate(frames):
            if atoms.pbc.any():
                raise ConfigError(
                    f"reference.kind 'pyscf': periodic cells are not supported (frame {i}, "
                    f"{atoms.get_chemical_formula()}, pbc={atoms.pbc.tolist()})"
                )
    store = store if isinstance(store, LabelStore) else LabelStore(store)
    known = store.hashes()
    summary = LabelSummary()
    with _progress(progress) as bar:
        task = bar.add_task("labelling", total=n, status="")
        for atoms, prov, pred in zip(frames, provs, preds, strict=True):
            h = structure_hash(atoms)
            if h in known and not (retry_failed and known[h][1] == "failed"):
                summary.skipped += 1
                summary.ids.append(known[h][0])
            else:
                done = run_with_retries(atoms, cfg)
                summary.retries += done.attempts - 1
                summary.reference_seconds += done.seconds
                prov = {
                    **{k: v for k, v in prov.items() if k not in ("status", "error")},
                    "reference": done.reference,
                    "reference_seconds": done.seconds,
                    "attempts": done.attempts,
                }
                if done.result is not None:
                    row = store.add(
                        atoms,
                        energy=done.result.energy,
                        forces=done.result.forces,
                        predicted_forces=pred,
                        **{**prov, "status": "ok"},
                    )
                    summary.ok += 1
                else:
                    row = store.add(atoms, **{**prov, "status": "failed", "error": done.error})
                    summary.failed += 1
                known[h] = (row, "ok" if done.result is not None else "failed")
                summary.ids.append(row)
            bar.update(
                task,
                advance=1,
                status=f"ok {summary.ok} failed {summary.failed} skipped {summary.skipped}",
            )
    return summary
