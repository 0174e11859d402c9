"""Several MD walkers advanced in lock-step, their model calls batched into one pass per step.

On a GPU one MC-dropout pass over 64 small molecules costs about what one molecule costs, so
walkers should not be evaluated one by one. Each walker still runs the ordinary
:func:`mlforce.md.run_walker` (ASE dynamics through ``dyn.irun``, triggers, rollbacks, labels),
in its own thread, with a :class:`LockstepCalculator` in place of the model calculator. When a
walker's integrator asks for forces, its calculator hands the structure to a shared
:class:`Lockstep` and waits; once every live walker has handed one in, the last one runs
:meth:`MLForceCalculator.predict` on all of them in one batched call (MC dropout for all of
them if any walker is at a check step) and wakes the others. A walker that finishes or fails
leaves the group and is no longer waited for; a walker that is labelling (the reference runs in
its own thread) is waited for, so all walkers stay at the same step.

Results equal one-by-one evaluation: dropout masks are keyed per structure in the batch (see
:mod:`mlforce.nn.dropout`), so batching changes no sample. Measured for 64 ethanol walkers
(docs/benchmarks.md, section 4): 6-11x more walker-steps/s on an H100; on one CPU core 1.9x
with deterministic forces and none with MC at every step (the pass is compute-bound there).
:func:`run_walkers` with ``lockstep=False`` runs walkers one by one.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import MDConfig
from mlforce.md import WalkerSummary, run_walker


class Lockstep:
    """Collects one structure per live walker, then evaluates them all in one batched call."""

    def __init__(
        self, calc: MLForceCalculator, walkers: int, bias_strengths: Sequence[float] | None = None
    ) -> None:
        self.calc = calc
        # the latent bias's A (eV) for each walker (None: the calculator's for all)
        self.bias_strengths = None if bias_strengths is None else list(bias_strengths)
        self.live = walkers
        self.cond = threading.Condition()
        self.pending: dict[int, tuple[Atoms, bool]] = {}
        self.samples: dict[int, int] = {}
        self.ready: dict[int, dict[str, Any] | BaseException] = {}
        self.batches = 0  # batched calls made (one per lock-step, for benchmarks)
        self.structures = 0  # structures evaluated in them

    def evaluate(
        self, walker: int, atoms: Atoms, uncertainty: bool, sample_index: int | None = None
    ) -> dict[str, Any]:
        """Results for ``atoms`` from the next batched call (blocks until it has run).

        ``sample_index``: the posterior sample driving this walker (``prediction="sample"``;
        default: the walker's position in the group)."""
        with self.cond:
            self.pending[walker] = (atoms.copy(), uncertainty)
            self.samples[walker] = walker if sample_index is None else sample_index
            self._flush_if_full()
            while walker not in self.ready:
                self.cond.wait()
            out = self.ready.pop(walker)
        if isinstance(out, BaseException):
            raise out
        return out

    def leave(self) -> None:
        """A walker is done: stop waiting for it."""
        with self.cond:
            self.live -= 1
            self._flush_if_full()

    def _flush_if_full(self) -> None:
        if not self.pending or len(self.pending) < self.live:
            return
        walkers = list(self.pending)
        structures = [self.pending[w][0] for w in walkers]
        self.calc.uncertainty = any(self.pending[w][1] for w in walkers)
        self.pending.clear()
        try:
            with torch.inference_mode(False):
                strengths = self.bias_strengths
                results: Sequence[dict[str, Any] | BaseException] = self.calc.predict(
                    structures, [self.samples[w] for w in walkers],
                    None if strengths is None else [strengths[w] for w in walkers],
                )  # fmt: skip
        except BaseException as exc:  # every waiting walker gets the error
            results = [exc] * len(walkers)
        self.batches += 1
        self.structures += len(walkers)
        for w, r in zip(walkers, results, strict=True):
            self.ready[w] = r
        self.cond.notify_all()


class LockstepCalculator(Calculator):
    """One walker's view of a :class:`Lockstep` group: an ASE calculator like the model's."""

    implemented_properties = MLForceCalculator.implemented_properties

    def __init__(self, group: Lockstep, walker: int, sample_index: int | None = None) -> None:
        super().__init__()
        self.group, self.walker = group, walker
        self.sample_index = walker if sample_index is None else sample_index
        self.checkpoint = group.calc.checkpoint
        self.prediction = group.calc.prediction
        self.uncertainty = True

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        # predict() adds stress only for periodic batches (a batch is all one or the other)
        self.results = self.group.evaluate(
            self.walker, self.atoms, self.uncertainty, self.sample_index
        )


def run_walkers(
    calc: MLForceCalculator,
    starts: Sequence[Atoms],
    temperatures: Sequence[float],
    md: MDConfig,
    seeds: Sequence[int],
    *,
    lockstep: bool = True,
    per_walker: Sequence[dict[str, Any]] | None = None,
    bias_strengths: Sequence[float] | None = None,
    **common: Any,
) -> list[WalkerSummary]:
    """Run ``len(starts)`` walkers with :func:`run_walker`; in lock-step (batched) or one by one.

    ``per_walker[i]`` holds keyword arguments for walker ``i`` only (``trajectory``,
    ``candidates``, ``walker``); ``common`` those for all. ``bias_strengths``: the latent
    bias's A (eV) for each walker (None: the calculator's ``bias_strength`` for all). Each
    ``starts[i]`` is advanced in place. Summaries come back in walker order. Same seeds, same
    trajectories either way.
    """
    n = len(starts)
    if not (len(temperatures) == len(seeds) == n):
        raise ValueError("starts, temperatures and seeds must have the same length")
    per_walker = per_walker or [{} for _ in range(n)]
    kwargs = [{"walker": i, **common, **per_walker[i]} for i in range(n)]
    if not lockstep or n == 1:
        summaries = []
        default_strength = calc.bias_strength
        for i in range(n):
            calc.sample_index = kwargs[i]["walker"]  # prediction "sample": the walker's own
            calc.bias_strength = default_strength if bias_strengths is None else bias_strengths[i]
            summaries.append(
                run_walker(calc, starts[i], temperatures[i], md, seed=seeds[i], **kwargs[i])
            )
        calc.bias_strength = default_strength
        return summaries
    group = Lockstep(calc, n, bias_strengths)

    def one(i: int) -> WalkerSummary:
        try:
            return run_walker(
                LockstepCalculator(group, i, kwargs[i]["walker"]),  # type: ignore[arg-type]
                starts[i], temperatures[i], md, seed=seeds[i], **kwargs[i],
            )  # fmt: skip
        finally:
            group.leave()

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="walker") as pool:
        return list(pool.map(one, range(n)))
