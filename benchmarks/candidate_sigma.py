"""How well σ ranks the true error within a round's candidate pool: the walkers' σ against
σ re-scored with more MC samples and fresh masks (docs/benchmarks.md 16).

For each round of a finished campaign, labels every candidate frame with the reference (xTB
by default, cheap for small molecules), and computes the Spearman rank correlation between
the true max per-atom force error of the round model and (a) the σ the walker recorded,
(b) σ re-scored with T = 16 under three mask seeds, (c) T = 64 and T = 128.

    python benchmarks/candidate_sigma.py runs/demo_e150 --rounds 1 2 3 4 > out.json

Prints JSON: per round, the number of candidates, the median true error and the Spearman
coefficients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from ase.io import read

from mlforce.calculators.reference import build_reference
from mlforce.campaign import RunDir
from mlforce.checkpoint import load_checkpoint
from mlforce.data import graphs_from_frames
from mlforce.metrics import spearman
from mlforce.uncertainty import predict_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a campaign run directory")
    parser.add_argument("--rounds", type=int, nargs="+", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = RunDir(Path(args.run))
    config = run.config()
    out = {"run": args.run, "rounds": {}}
    for r in args.rounds:
        frames = []
        for path in sorted(run.round_dir(r).glob("candidates_*.extxyz")):
            if path.stat().st_size:
                frames += read(path, ":")
        ckpt = load_checkpoint(run.checkpoint(r))
        graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff)
        reference = []
        for frame in frames:
            atoms = frame.copy()
            atoms.calc = build_reference(config.reference, atoms)
            reference.append(atoms.get_forces())
        walker = np.array([f.info.get("max_force_std", np.nan) for f in frames])
        row: dict = {"candidates": len(frames)}
        errors = None
        for samples, seeds in ((16, (0, 1, 2)), (64, (0,)), (128, (0,))):
            for seed in seeds:
                pred = predict_dataset(ckpt.models, graphs, samples, seed=seed)
                errors = np.array(
                    [np.linalg.norm(f - g, axis=1).max() for f, g in zip(pred.forces, reference)]
                )
                row[f"spearman_T{samples}_seed{seed}"] = spearman(pred.max_force_std(), errors)
        row["spearman_walker"] = spearman(walker, errors)
        row["median_true_max_force_error"] = float(np.median(errors))
        out["rounds"][r] = row
        print(f"round {r}: {row}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
