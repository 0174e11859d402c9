"""ASE calculators that fail on purpose, for the labelling tests (used by import path).

``FlakyEMT(mode, x_above, sleep_s)`` is EMT, except on structures whose first atom has
x > ``x_above`` (Å), where it raises (``mode="raise"``), returns NaN forces (``"nan"``), sleeps
``sleep_s`` seconds (``"sleep"``), or ends its process (``"exit"``); ``"none"`` never misbehaves.
"""

from __future__ import annotations

import os
import time

import numpy as np
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from tblite.ase import TBLite


class FlakyEMT(EMT):
    """EMT that misbehaves on chosen structures (see module docstring)."""

    def __init__(
        self, mode: str = "raise", x_above: float = -np.inf, sleep_s: float = 60.0, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if mode not in ("raise", "nan", "sleep", "exit", "none"):
            raise TypeError(f"unknown mode {mode!r}")
        self.mode, self.x_above, self.sleep_s = mode, x_above, sleep_s

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties or ["energy"], system_changes)
        if self.mode == "none" or self.atoms.positions[0, 0] <= self.x_above:
            return
        if self.mode == "raise":
            raise RuntimeError(f"synthetic failure at x={self.atoms.positions[0, 0]:.3f}")
        if self.mode == "nan":
            self.results["forces"] = np.full_like(self.results["forces"], np.nan)
        elif self.mode == "exit":
            os._exit(3)  # as if the reference crashed hard (segfault, out of memory)
        else:
            time.sleep(self.sleep_s)


class CountingXTB(TBLite):
    """Real GFN2-xTB (tblite) that logs each finished call's structure hash to ``counter``.

    With ``fail_percent`` it raises, every time, on that share of structures (chosen by hash),
    so retries cannot rescue them: a reference that fails on some frames, deterministically.
    With ``transient_percent`` it raises on that share of *calls* at random (a retry usually
    succeeds). Calls whose 0-based number (finished calls in ``counter`` so far) falls in one
    of the ``slow`` windows ``[[from, to], ...]`` take ``slow_s`` seconds: moments in which a
    test can kill the campaign.
    """

    def __init__(
        self,
        counter: str,
        fail_percent: float = 0.0,
        transient_percent: float = 0.0,
        slow: list | None = None,
        slow_s: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(method="GFN2-xTB", verbosity=0, **kwargs)
        self.counter, self.fail_percent = counter, fail_percent
        self.transient_percent = transient_percent
        self.slow, self.slow_s = slow or [], slow_s
        self.rng = np.random.default_rng()

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        from mlforce.store import structure_hash

        h = structure_hash(atoms if atoms is not None else self.atoms)
        if int(h[-4:], 16) % 100 < self.fail_percent:
            self._log("failed " + h)
            raise RuntimeError(f"synthetic SCF failure for {h}")
        if self.rng.uniform(0, 100) < self.transient_percent:
            self._log("transient " + h)
            raise RuntimeError(f"synthetic transient failure for {h}")
        done = self._finished()
        if any(lo <= done < hi for lo, hi in self.slow):
            time.sleep(self.slow_s)
        super().calculate(atoms, properties, system_changes)
        self._log(h)

    def _finished(self) -> int:
        if not os.path.exists(self.counter):
            return 0
        with open(self.counter) as fh:
            return sum(1 for line in fh if line.startswith("v1-"))

    def _log(self, line: str) -> None:
        with open(self.counter, "a") as fh:
            fh.write(line + "\n")


def finished_calls(counter: str) -> list[str]:
    """Hashes of the finished calls a CountingXTB logged, in order."""
    with open(counter) as fh:
        return [line.strip() for line in fh if line.startswith("v1-")]


class OpenMPThreads(EMT):
    """Reports the OpenMP thread count of the calling thread as its energy (eV); zero forces.

    The count tblite and PySCF would use when called at the same place (they share libgomp).
    """

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        import ctypes

        super().calculate(atoms, properties or ["energy"], system_changes)
        threads = ctypes.CDLL("libgomp.so.1").omp_get_max_threads()
        self.results["energy"] = float(threads)
        self.results["forces"] = np.zeros_like(self.results["forces"])
