"""Seconds per B3LYP label as the flow's label tasks run them: two at a time in two threads of
one process, one thread each, in the thread or in a child process per call (what
``reference.timeout_s`` needs). Prints one JSON object.

    python benchmarks/dft_label_cost.py --timeout none   # in the task's thread
    python benchmarks/dft_label_cost.py --timeout 900    # a child process per call
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from ase.io import read

from mlforce.calculators.reference import compute_reference
from mlforce.config import ReferenceConfig
from mlforce.device import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/ethanol_test_300K.extxyz")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--timeout", default="none", help="'none' or seconds")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    timeout = None if args.timeout == "none" else float(args.timeout)
    cfg = ReferenceConfig(kind="pyscf", method="B3LYP", density_fit=True, timeout_s=timeout)
    frames = read(args.data, f"0:{args.frames}")

    def one(atoms) -> float:
        set_threads(1)  # as mlforce's tasks do (torch, OpenMP and the loaded BLAS)
        return compute_reference(atoms, cfg).seconds

    set_threads(1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        seconds = list(pool.map(one, frames))
    print(json.dumps({"timeout_s": timeout, "workers": args.workers, "seconds": seconds,
                      "mean_seconds": sum(seconds) / len(seconds),
                      "wall_seconds": time.perf_counter() - t0}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
