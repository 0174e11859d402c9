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
    """Real GFN2-xTB (tblite) that logs every call's structure hash to ``counter`` (a file).

    With ``fail_percent`` it raises, every time, on that share of structures (chosen by hash),
    so retries cannot rescue them: a reference that fails on some frames, deterministically.
    """

    def __init__(self, counter: str, fail_percent: float = 0.0, **kwargs) -> None:
        super().__init__(method="GFN2-xTB", verbosity=0, **kwargs)
        self.counter, self.fail_percent = counter, fail_percent

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        from mlforce.store import structure_hash

        h = structure_hash(atoms if atoms is not None else self.atoms)
        with open(self.counter, "a") as fh:
            fh.write(h + "\n")
        if int(h[-4:], 16) % 100 < self.fail_percent:
            raise RuntimeError(f"synthetic SCF failure for {h}")
        super().calculate(atoms, properties, system_changes)
