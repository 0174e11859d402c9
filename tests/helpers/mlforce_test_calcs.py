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
