"""Writes labels into a LabelStore from a separate process (concurrency and crash tests).

``python store_writer.py DB WORKER N_DISTINCT N_SHARED [GO_FILE]``: adds N_DISTINCT structures of
its own and N_SHARED structures that every worker adds, in a shuffled order, after GO_FILE
exists; prints ``<row id> <x>`` after each ``add`` has returned.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms

from mlforce.store import LabelStore


def dimer(x: float) -> Atoms:
    """Cu2 at distance x (Å): a distinct structure for each x."""
    return Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [x, 0.0, 0.0]])


def main() -> None:
    db, worker, n_distinct, n_shared = sys.argv[1], *map(int, sys.argv[2:5])
    go = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    store = LabelStore(db)
    xs = [2.0 + 1e-3 * (worker * 100_000 + k) for k in range(n_distinct)]
    xs += [50.0 + 1e-3 * k for k in range(n_shared)]
    random.Random(worker).shuffle(xs)
    while go is not None and not go.exists():
        time.sleep(0.005)
    for x in xs:
        row = store.add(
            dimer(x), energy=-x, forces=np.full((2, 3), x), reference="test", walker=worker
        )
        print(row, repr(x), flush=True)


if __name__ == "__main__":
    main()
