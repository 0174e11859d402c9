"""Accuracy of the shipped config: train on 1000 xTB ethanol frames (300-800 K), evaluate on
independent 300 K and 800 K xTB trajectories. Prints one JSON object with training time.

    make data   # once: datasets/ethanol_{train,test_300K,test_800K}.extxyz
    python benchmarks/accuracy.py --out runs/bench/mc [--set training.threads=1]
    python benchmarks/accuracy.py --checkpoint runs/bench/mc   # evaluate an existing model
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from mlforce.checkpoint import load_checkpoint
from mlforce.cli import _parse_overrides, run_evaluation, run_training


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--out", default="runs/bench/accuracy")
    parser.add_argument("--checkpoint", help="skip training, evaluate this checkpoint")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.checkpoint:
        ckpt = args.checkpoint
        training = load_checkpoint(ckpt).metadata.get("training", {})
    else:
        training = run_training(args.config, None, args.out, _parse_overrides(args.set))
        ckpt = training["checkpoint"]
    result = {
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "training_seconds": training.get("seconds"), "epochs": training.get("epochs"),
        "stop_reason": training.get("stop_reason"),
        "val_force_mae": training.get("val_force_mae"),
    }  # fmt: skip
    for name in ("300K", "800K"):
        m = run_evaluation(ckpt, f"datasets/ethanol_test_{name}.extxyz")
        result[name] = {k: m[k] for k in ("force_mae", "force_rmse", "energy_mae_per_atom")}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
