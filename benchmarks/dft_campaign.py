"""The DFT campaign: configs/ethanol_dft.yaml (PySCF B3LYP/def2-SVP) end to end, then scored.

Runs the flow (with any ``--set`` reductions, which are printed), labels ``--test-frames``
frames of the independent 300 K xTB ethanol trajectory with the same DFT to score the final
model, and projects the speedup over DFT-only MD for the campaign's simulated time. Prints one
JSON object.

    python benchmarks/dft_campaign.py --run-dir runs/bench/dft \\
        --set active_learning.max_rounds=3 --set active_learning.labels_per_round=10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read

from mlforce.calculators.ml import MLForceCalculator
from mlforce.calculators.reference import compute_reference
from mlforce.campaign import RunDir
from mlforce.store import LabelStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/ethanol_dft.yaml")
    parser.add_argument("--run-dir", default="runs/bench/dft")
    parser.add_argument("--test-frames", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "flows.active_learning", args.config, "--run-dir", args.run_dir]
    for item in args.set:
        cmd += ["--set", item]
    subprocess.run(cmd, check=True)
    flow_seconds = time.perf_counter() - t0
    run = RunDir(Path(args.run_dir))
    config, state = run.config(), run.state()
    rows = LabelStore(run.ledger).rows()
    dft_seconds = [r["reference_seconds"] for r in rows if "reference_seconds" in r]
    seed_rows = [r for r in rows if r.get("trigger") == "seed"]
    test = read("datasets/ethanol_test_300K.extxyz", ":")
    picks = [test[i] for i in np.linspace(0, len(test) - 1, args.test_frames).astype(int)]
    calc = MLForceCalculator(state["final_checkpoint"], device="cpu", uncertainty=False)
    errors, test_seconds = [], []
    for atoms in picks:
        ref = compute_reference(atoms, config.reference)
        test_seconds.append(ref.seconds)
        pred = calc.predict([atoms])[0]["forces"]
        errors.append(np.abs(pred - ref.forces))
    per_call = float(np.mean(dft_seconds)) if dft_seconds else float(np.mean(test_seconds))
    simulated_fs = 1000 * sum(r["simulated_ps"] for r in state["rounds"])
    dft_md_seconds = simulated_fs / config.md.timestep_fs * per_call
    stages = {k: sum(r[k] for r in state["rounds"])
              for k in ("train_seconds", "simulate_seconds", "label_seconds")}  # fmt: skip
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "reductions": args.set,
        "reference": rows[0].get("reference") if rows else None,
        "dft_calls": len(rows), "dft_calls_seed": len(seed_rows),
        "dft_failed": sum(r.get("status") == "failed" for r in rows),
        "dft_seconds_per_call": per_call, "dft_seconds_total": float(sum(dft_seconds)),
        "rounds": len(state["rounds"]), "stop_reason": state.get("stop_reason"),
        "stage_seconds": stages, "flow_wall_seconds": flow_seconds,
        "final_force_mae_vs_dft": float(np.mean(np.concatenate(errors))),
        "test_frames": len(picks), "simulated_fs": simulated_fs,
        "dft_only_md_seconds_projected": dft_md_seconds,
        "speedup_over_dft_md": dft_md_seconds / flow_seconds,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
