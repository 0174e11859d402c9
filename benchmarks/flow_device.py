"""Round times of the tiny active-learning flow on CPU and on CUDA, in one run.

Runs ``configs/tiny.yaml`` (real GFN2-xTB reference, real Prefect with a temporary server)
once per device and prints one JSON object: per round, wall/train/simulate/label seconds, and
the CUDA/CPU ratio of each. On CUDA the walkers run in lock-step (``md.lockstep: auto``).

    python benchmarks/flow_device.py [--devices cpu cuda] [--set md.steps=400 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import torch

from mlforce.cli import _parse_overrides

KEYS = ("wall_seconds", "train_seconds", "simulate_seconds", "label_seconds")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", default=[])
    args = parser.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from flows.active_learning import run_campaign

    overrides = _parse_overrides(args.set)
    devices = [d for d in args.devices if d != "cuda" or torch.cuda.is_available()]
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"), "config": args.config, "overrides": overrides,
        "runs": {},
    }  # fmt: skip
    with prefect_test_harness(server_startup_timeout=180), tempfile.TemporaryDirectory() as tmp:
        for device in devices:
            t0 = time.perf_counter()
            state = run_campaign(args.config, f"{tmp}/{device}", device=device, **overrides)
            rounds = [{"round": r["round"], **{k: r[k] for k in KEYS},
                       "labels_added": r["labels_added"]} for r in state["rounds"]]  # fmt: skip
            result["runs"][device] = {"total_seconds": time.perf_counter() - t0,
                                      "rounds": rounds}  # fmt: skip
            print(f"{device}: {json.dumps(result['runs'][device])}", file=sys.stderr)
    if "cpu" in result["runs"] and "cuda" in result["runs"]:
        cpu, gpu = result["runs"]["cpu"]["rounds"], result["runs"]["cuda"]["rounds"]
        result["cuda_over_cpu"] = [
            {"round": c["round"], **{k: g[k] / c[k] if c[k] else None for k in KEYS}}
            for c, g in zip(cpu, gpu, strict=False)
        ]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
