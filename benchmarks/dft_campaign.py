"""The DFT campaign (configs/ethanol_dft.yaml, PySCF B3LYP/def2-SVP): scored against DFT.

1. Independent DFT test sets (made once, git-ignored): ``--test-frames`` frames spread evenly
   over each independent xTB ethanol trajectory (``datasets/ethanol_test_{300,800}K.extxyz``,
   from ``make data``), relabelled with the campaign's own DFT settings, two processes of one
   thread each -> ``datasets/ethanol_dft_test_{300,800}K.extxyz``. The geometries come from
   GFN2-xTB MD at 300 and 800 K: never seen by the campaign, which samples with its own model.
2. With ``--run``: the campaign itself, ``mlforce run CONFIG --run-dir RUN`` (resumes a run
   directory that exists), timed.
3. The score: force MAE of every round's model and of the final model on both DFT test sets,
   DFT calls (seed and selected, failed ones, repeated structures), DFT seconds, the flow's wall
   time from its rounds, the simulated ML MD, and the projected cost of DFT-only MD for the
   same simulated time (steps x mean seconds per DFT call on one core). One JSON object.

    python benchmarks/dft_campaign.py --run-dir runs/ethanol_dft [--run] [--test-frames 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

TEMPERATURES = (300, 800)


def _label(atoms, reference):  # in a worker process of one thread
    from mlforce.calculators.reference import compute_reference

    return compute_reference(atoms, reference)


def _init_worker() -> None:
    from mlforce.device import set_threads

    set_threads(1)


def dft_test_sets(reference, frames: int, workers: int) -> dict[str, str]:
    """The DFT-labelled test files (made when missing or of another size); name -> path."""
    out = {}
    for t in TEMPERATURES:
        source = Path(f"datasets/ethanol_test_{t}K.extxyz")
        path = Path(f"datasets/ethanol_dft_test_{t}K.extxyz")
        out[f"{t}K"] = str(path)
        if path.is_file() and len(read(path, ":")) == frames:
            continue
        if not source.is_file():
            raise SystemExit(f"{source} is missing: run `make data` first")
        traj = read(source, ":")
        picks = [traj[i] for i in np.linspace(0, len(traj) - 1, frames).astype(int)]
        t0 = time.perf_counter()
        os.environ["OMP_NUM_THREADS"] = "1"
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            results = list(pool.map(_label, picks, [reference] * len(picks)))
        labelled = []
        for atoms, ref in zip(picks, results, strict=True):
            clean = atoms.copy()
            clean.calc = SinglePointCalculator(clean, energy=ref.energy, forces=ref.forces)
            clean.info = {"reference": ref.reference, "reference_seconds": ref.seconds}
            labelled.append(clean)
        write(path.with_suffix(".tmp.extxyz"), labelled, format="extxyz")
        os.replace(path.with_suffix(".tmp.extxyz"), path)
        print(f"{path}: {frames} DFT labels in {time.perf_counter() - t0:.0f} s "
              f"({np.mean([r.seconds for r in results]):.1f} s each, {workers} workers)",
              file=sys.stderr, flush=True)  # fmt: skip
    return out


def main() -> None:
    from mlforce.campaign import RunDir, test_errors
    from mlforce.config import load_config
    from mlforce.store import LabelStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ethanol_dft.yaml")
    parser.add_argument("--run-dir", default="runs/ethanol_dft")
    parser.add_argument("--run", action="store_true", help="run (or resume) the campaign first")
    parser.add_argument("--test-frames", type=int, default=50, help="per temperature")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    config = load_config(args.config)
    tests = dft_test_sets(config.reference, args.test_frames, args.workers)
    flow_seconds = None
    if args.run:
        t0 = time.perf_counter()
        cmd = ["mlforce", "run", args.config, "--run-dir", args.run_dir]
        subprocess.run(cmd, check=True)
        flow_seconds = time.perf_counter() - t0
    run = RunDir(Path(args.run_dir))
    state = run.state()
    if not state.get("final_checkpoint"):
        raise SystemExit(f"{run.root}: the campaign has not finished (no final checkpoint)")
    rows = LabelStore(run.ledger).rows()
    ok = [r for r in rows if r.get("status") == "ok"]
    seconds = [r["reference_seconds"] for r in rows if "reference_seconds" in r]
    per_call = float(np.mean(seconds))
    rounds = state["rounds"]
    simulated_fs = 1000 * sum(r["simulated_ps"] for r in rounds)
    dft_md_seconds = simulated_fs / config.md.timestep_fs * per_call
    wall = sum(r["wall_seconds"] for r in rounds) + state.get("final_train_seconds", 0.0)
    files = list(tests.values())
    curve = []
    for r in rounds:
        errors = test_errors(r["checkpoint"], files)
        curve.append({"round": r["round"], "labels_total": r["labels_total"] - r["labels_added"],
                      "triggers_per_ps": r["triggers_per_ps"],
                      **{k: errors[Path(v).stem] for k, v in tests.items()}})  # fmt: skip
    final = test_errors(state["final_checkpoint"], files)
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "config": args.config, "run_dir": str(run.root),
        "reference": ok[0].get("reference") if ok else None,
        "stop_reason": state.get("stop_reason"), "rounds": len(rounds),
        "dft_calls": len(rows), "dft_calls_seed": sum(r.get("trigger") == "seed" for r in rows),
        "dft_failed": len(rows) - len(ok),
        "distinct_structures": len({r["structure_hash"] for r in rows}),
        "dft_seconds_per_call": per_call, "dft_seconds_total": float(sum(seconds)),
        "stage_seconds": {k: sum(r[k] for r in rounds)
                          for k in ("train_seconds", "simulate_seconds", "label_seconds")},
        "flow_wall_seconds_from_rounds": wall, "flow_wall_seconds_this_call": flow_seconds,
        "test_frames": {k: len(read(v, ":")) for k, v in tests.items()},
        "final_checkpoint": state["final_checkpoint"],
        "final_force_mae_vs_dft": {k: final[Path(v).stem] for k, v in tests.items()},
        "curve": curve, "simulated_fs": simulated_fs,
        "dft_only_md_seconds_projected": dft_md_seconds,
        "dft_only_md_over_campaign": dft_md_seconds / wall if wall else None,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
