"""Scaling with system size: energy + forces and T-sample MC-dropout σ on liquid-water boxes.

Cubic boxes of randomly oriented water molecules at 1.0 g/cm³ (periodic, built by
:func:`mlforce.structures.water_box` as `mlforce build water` builds them), from 4 to 3456
molecules (12 to 10 368 atoms). Each size runs in its own process so that its peak memory
(``ru_maxrss``) is its own. Times are the full calculator path (vesin neighbour list, graph,
model, forces; medians over repeats); the model has the shipped ethanol config's architecture
(64 features, 3 blocks, cutoff 5 Å, dropout in every block) with random weights — the cost
does not depend on the weights. MC copies are split into passes of at most
``uncertainty.default_max_edges`` edges (the mechanism that keeps big walkers in memory).

    python benchmarks/scaling.py [--threads 1] [--device cpu|cuda] [--samples 16]
    python benchmarks/scaling.py --sizes 4 32 64 --xtb GFN1-xTB    # the model against tblite

Prints one JSON object: per size, atoms, edges, ms per deterministic call, ms per T-sample σ
call, their ratio, and the process's peak resident memory (MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

SIZES = [4, 32, 108, 256, 864, 2048, 3456]  # water molecules


def measure(n_molecules: int, samples: int, device: str, threads: int, xtb: str = "") -> dict:
    # isort: off
    import mlforce  # noqa: F401  (before torch: its allocator settings, see mlforce/__init__.py)
    import torch

    # isort: on

    from mlforce.calculators.ml import MLForceCalculator
    from mlforce.checkpoint import Checkpoint
    from mlforce.config import load_config
    from mlforce.model import ForceField
    from mlforce.structures import water_box

    torch.set_num_threads(threads)
    config = load_config("configs/ethanol_xtb.yaml")
    torch.manual_seed(0)
    model = ForceField([1, 8], config.model)
    ckpt = Checkpoint(models=[model.eval()], calibration={"method": "none"})
    atoms = water_box(n_molecules)
    repeats = 5 if len(atoms) < 1000 else 2 if len(atoms) < 5000 else 1
    # one warm-up call at every size: with huge pages (mlforce/__init__.py) the first large
    # call also pays for the kernel finding them (measured: 6 144 atoms 11.3 s as the mean of
    # the first two calls, against ~4.4 s per copy in the σ passes after them)
    warmup = 1
    if device == "cuda":  # a GPU's first call pays for context and kernel set-up
        repeats, warmup = max(repeats, 3), 1

    def timed(uncertainty: bool) -> float:
        calc = MLForceCalculator(ckpt, device=device, mc_samples=samples, uncertainty=uncertainty)
        times = []
        for r in range(repeats + warmup):
            atoms.calc = calc
            calc.reset()
            t0 = time.perf_counter()
            atoms.get_forces()
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times.append(time.perf_counter() - t0)
        return 1000 * float(np.median(times))

    from mlforce.graph import atoms_to_graph

    edges = int(atoms_to_graph(atoms, [1, 8], config.model.cutoff).edge_index.shape[1])
    det = timed(False)
    mc = timed(True) if samples else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    out = {"molecules": n_molecules, "atoms": len(atoms), "edges": edges,
           "deterministic_ms": det, "peak_rss_mib": peak,
           "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE")}  # fmt: skip
    if mc is not None:
        out.update({f"sigma_T{samples}_ms": mc, "ratio": mc / det})
    if device == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if xtb:
        out.update(xtb_cost(atoms, xtb))
    return out


def xtb_cost(atoms, method: str) -> dict:
    """The reference for the same box: one tblite single point from scratch, then the median
    of 3 calls after 0.01 Å displacements (an MD step's cost: the calculator restarts from
    the last wavefunction)."""
    from tblite.ase import TBLite

    box = atoms.copy()
    box.calc = TBLite(method=method, verbosity=0)
    t0 = time.perf_counter()
    box.get_forces()
    first = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(3):
        box.positions += rng.normal(scale=0.01, size=box.positions.shape)
        t0 = time.perf_counter()
        box.get_forces()
        steps.append(time.perf_counter() - t0)
    return {"xtb_method": method, "xtb_first_ms": 1000 * first,
            "xtb_step_ms": 1000 * float(np.median(steps))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="water molecules")
    parser.add_argument("--samples", type=int, default=16, help="T for σ (0: energy + forces only)")
    parser.add_argument(
        "--no-thp",
        action="store_true",
        help="THP_MEM_ALLOC_ENABLE=0: torch's CPU buffers on ordinary pages (the baseline)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--xtb", default="", help="also time tblite (e.g. GFN1-xTB) per box")
    parser.add_argument("--xtb-max", type=int, default=64, help="largest box (molecules) for it")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child process: one size
    args = parser.parse_args()
    if args.one is not None:
        xtb = args.xtb if args.one <= args.xtb_max else ""
        print(json.dumps(measure(args.one, args.samples, args.device, args.threads, xtb)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--samples", str(args.samples),
               "--device", args.device, "--threads", str(args.threads), "--xtb", args.xtb,
               "--xtb-max", str(args.xtb_max)]  # fmt: skip
        env = {**os.environ, **({"THP_MEM_ALLOC_ENABLE": "0"} if args.no_thp else {})}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            rows.append({"molecules": n, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    machine = platform.processor() or platform.machine()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "device": args.device,
              "threads": args.threads, "samples": args.samples,
              "thp_mem_alloc": not args.no_thp, "rows": rows}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
