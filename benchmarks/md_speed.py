"""MD speed on ethanol: the mlforce model without uncertainty, with MC dropout every step and
every 10 steps, and plain GFN2-xTB MD, in one run. Prints one JSON object (steps per second
and ratios to the deterministic model).

    python benchmarks/md_speed.py --checkpoint runs/bench/mc [--steps 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import MDConfig, TriggerConfig
from mlforce.md import load_start_structure, run_walker


def ml_rate(checkpoint: str, steps: int, check_every: int | None, mc_samples: int) -> float:
    calc = MLForceCalculator(checkpoint, device="cpu", mc_samples=mc_samples)
    every = check_every or steps + 1  # never check: deterministic forces only
    md = MDConfig(steps=steps, trajectory_every=10**9,
                  triggers=TriggerConfig(lower=1e9, upper=2e9, check_every=every))  # fmt: skip
    atoms = load_start_structure("data/ethanol.xyz")
    if check_every is None:
        calc.uncertainty = False
    t0 = time.perf_counter()
    summary = run_walker(calc, atoms, 500.0, md, seed=0)
    if check_every is None:
        assert summary.checks <= 1
    return steps / (time.perf_counter() - t0)


def xtb_rate(steps: int) -> float:
    from tblite.ase import TBLite

    atoms = load_start_structure("data/ethanol.xyz")
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.01 / units.fs,
                   fixcm=False, rng=np.random.default_rng(0))  # fmt: skip
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    det = ml_rate(args.checkpoint, args.steps, None, args.mc_samples)
    mc1 = ml_rate(args.checkpoint, args.steps, 1, args.mc_samples)
    mc10 = ml_rate(args.checkpoint, args.steps, 10, args.mc_samples)
    xtb = xtb_rate(args.steps)
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"), "system": "ethanol (9 atoms), Langevin 500 K",
        "steps": args.steps, "mc_samples": args.mc_samples,
        "steps_per_s": {"model_deterministic": det, "model_mc_every_step": mc1,
                        "model_mc_every_10_steps": mc10, "xtb": xtb},
        "ratio_to_deterministic": {"mc_every_step": mc1 / det, "mc_every_10_steps": mc10 / det,
                                   "xtb": xtb / det},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
