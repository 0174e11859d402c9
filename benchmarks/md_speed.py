"""MD speed on ethanol: the mlforce model without uncertainty, with MC dropout every step and
every 10 steps, and plain GFN2-xTB MD, in one run. Prints one JSON object (steps per second
and ratios to the deterministic model).

With ``--walkers N`` it also runs N ethanol walkers (300-700 K) the same three ways, in
lock-step (one batched model call per step, :mod:`mlforce.lockstep`) and one by one, and
reports walker-steps per second for each and the lock-step speedup.

    python benchmarks/md_speed.py --checkpoint runs/bench/mc [--steps 1000] [--threads 1]
    python benchmarks/md_speed.py --checkpoint runs/bench/mc --device cuda --walkers 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np
import torch
from ase import units
from ase.md.langevin import Langevin

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import MDConfig, TriggerConfig
from mlforce.lockstep import run_walkers
from mlforce.md import load_start_structure, run_walker


def _md(steps: int, check_every: int | None) -> MDConfig:
    every = check_every or steps + 1  # never check: deterministic forces only
    return MDConfig(steps=steps, trajectory_every=10**9,
                    triggers=TriggerConfig(lower=1e9, upper=2e9, check_every=every))  # fmt: skip


def ml_rate(calc: MLForceCalculator, steps: int, check_every: int | None) -> float:
    atoms = load_start_structure("data/ethanol.xyz")
    t0 = time.perf_counter()
    summary = run_walker(calc, atoms, 500.0, _md(steps, check_every), seed=0)
    if check_every is None:
        assert summary.checks <= 1
    return steps / (time.perf_counter() - t0)


def walkers_rate(
    calc: MLForceCalculator, walkers: int, steps: int, check_every: int | None, lockstep: bool
) -> float:
    """Walker-steps per second for ``walkers`` ethanol walkers at 300-700 K."""
    starts = [load_start_structure("data/ethanol.xyz") for _ in range(walkers)]
    temps = list(np.linspace(300.0, 700.0, walkers))
    t0 = time.perf_counter()
    out = run_walkers(calc, starts, temps, _md(steps, check_every), list(range(walkers)),
                      lockstep=lockstep)  # fmt: skip
    assert all(s.steps == steps for s in out)
    return walkers * steps / (time.perf_counter() - t0)


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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--walkers", type=int, default=0, help="also time N walkers")
    parser.add_argument("--walker-steps", type=int, default=100, help="steps per walker")
    parser.add_argument("--no-xtb", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    calc = MLForceCalculator(args.checkpoint, device=args.device, mc_samples=args.mc_samples)
    ml_rate(calc, 20, 1)  # warm-up (CUDA context, allocator)
    det = ml_rate(calc, args.steps, None)
    mc1 = ml_rate(calc, args.steps, 1)
    mc10 = ml_rate(calc, args.steps, 10)
    rates = {"model_deterministic": det, "model_mc_every_step": mc1,
             "model_mc_every_10_steps": mc10}  # fmt: skip
    ratios = {"mc_every_step": mc1 / det, "mc_every_10_steps": mc10 / det}
    if not args.no_xtb:
        rates["xtb"] = xtb_rate(args.steps)
        ratios["xtb"] = rates["xtb"] / det
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": str(calc.device) + (
            f" ({torch.cuda.get_device_name()})" if calc.device.type == "cuda" else ""),
        "date": time.strftime("%Y-%m-%d"), "system": "ethanol (9 atoms), Langevin 500 K",
        "steps": args.steps, "mc_samples": args.mc_samples,
        "steps_per_s": rates, "ratio_to_deterministic": ratios,
    }  # fmt: skip
    if args.walkers:
        n, k = args.walkers, args.walker_steps
        w: dict = {"walkers": n, "steps_per_walker": k, "walker_steps_per_s": {}}
        for name, every in (("deterministic", None), ("mc_every_step", 1),
                            ("mc_every_10_steps", 10)):  # fmt: skip
            lock = walkers_rate(calc, n, k, every, True)
            seq = walkers_rate(calc, n, k, every, False)
            w["walker_steps_per_s"][name] = {"lockstep": lock, "one_by_one": seq,
                                             "lockstep_speedup": lock / seq}  # fmt: skip
            print(f"{n} walkers {name}: lockstep {lock:.0f}, one by one {seq:.0f} "
                  "walker-steps/s", file=sys.stderr)  # fmt: skip
        result["walkers"] = w
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
