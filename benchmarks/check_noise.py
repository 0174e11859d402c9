"""How much does the accuracy check's MAE of a model move with the check MD's seed?

The campaign's stop rule scores each round model on the frames of one reference MD
(``active_learning.check``: 40 frames, 100 steps apart, 500 K). This script makes several
independent check sets per design (trajectories x frames each, every trajectory from the start
structure with its own seed and ``interval`` steps of equilibration) and scores the given
models on each, so the spread of the check MAE and the separation of good from bad models can
be compared between designs at the same reference cost:

    python benchmarks/check_noise.py --model r6=runs/demo/round_006 --model bad=runs/x/model.pt \\
        --design 1x40 --design 8x5 --replicates 6

Prints JSON: per design and model, every replicate's force MAE (eV/Å) and mean / std / min / max.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase.io import write

from mlforce.campaign import test_errors
from mlforce.config import GenerateConfig, ReferenceConfig
from mlforce.generate import reference_md
from mlforce.md import load_start_structure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--design", action="append", default=None, metavar="TRAJxFRAMES")
    parser.add_argument("--replicates", type=int, default=6)
    parser.add_argument("--structure", default="data/ethanol.xyz")
    parser.add_argument("--temperature", type=float, default=500.0, help="K")
    parser.add_argument("--interval", type=int, default=100, help="MD steps between frames")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = dict(item.split("=", 1) for item in args.model)
    designs = args.design or ["1x40", "4x10", "8x5"]
    start = load_start_structure(args.structure)
    gen = GenerateConfig(interval=args.interval, equilibration_steps=args.interval)
    result: dict = {"temperature": args.temperature, "interval": args.interval, "designs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for d, design in enumerate(designs):
            n_traj, n_frames = (int(x) for x in design.split("x"))
            table: dict = {name: [] for name in models}
            for rep in range(args.replicates):
                frames = []
                for k in range(n_traj):
                    seed = 500_000 + 100_000 * d + 1000 * rep + k
                    frames += reference_md(
                        start, ReferenceConfig(), args.temperature, n_frames, gen, seed
                    )
                path = Path(tmp) / f"{design}_{rep}.extxyz"
                write(path, frames)
                for name, checkpoint in models.items():
                    table[name].append(
                        round(next(iter(test_errors(checkpoint, [str(path)]).values())), 4)
                    )
                print(
                    design, rep, {n: v[-1] for n, v in table.items()}, file=sys.stderr, flush=True
                )
            result["designs"][design] = {
                name: {
                    "mae": v,
                    "mean": round(float(np.mean(v)), 4),
                    "std": round(float(np.std(v)), 4),
                    "min": min(v),
                    "max": max(v),
                }
                for name, v in table.items()
            }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
