"""Which per-structure summary of the per-atom MC-dropout σ ranks the true max force error best.

The calculator's ``max_force_std`` is the largest per-atom σ of a structure. With few MC
samples each per-atom σ is noisy, and the max picks the atom whose noise came out high. This
script scores other summaries of the same per-atom σ (mean, root mean square, mean of the
top 3, max of the σ averaged over each atom's neighbours within a radius) against the true
largest per-atom force error, by Spearman and AUROC for the worst 10 %, for several T and mask
seeds:

    python benchmarks/sigma_aggregation.py CHECKPOINT \\
        --test 300K=datasets/ethanol_test_300K.extxyz \\
        --test 800K=datasets/ethanol_test_800K.extxyz --samples 16 64 --seeds 0 1 2

Prints JSON: per test set, per T and summary, the mean and the per-seed values.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mlforce.checkpoint import load_checkpoint
from mlforce.data import graphs_from_frames, read_labelled
from mlforce.metrics import auroc_top_fraction, spearman
from mlforce.uncertainty import predict_dataset


def summaries(per_atom: list[np.ndarray], frames: list, radii: list[float]) -> dict:
    """Per-structure scores (N,) from per-atom σ [(n_b,)]."""
    out = {
        "max": [a.max() for a in per_atom],
        "mean": [a.mean() for a in per_atom],
        "rms": [np.sqrt(np.mean(a**2)) for a in per_atom],
        "top3_mean": [np.sort(a)[-3:].mean() for a in per_atom],
    }
    for radius in radii:
        local = []
        for a, atoms in zip(per_atom, frames):
            near = (atoms.get_all_distances(mic=bool(atoms.pbc.any())) < radius).astype(float)
            local.append((near @ a / near.sum(1)).max())
        out[f"max_local_mean_{radius:g}A"] = local
    return {k: np.asarray(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--radii", type=float, nargs="*", default=[2.0, 3.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--against",
        choices=["deterministic", "mc_mean"],
        default="deterministic",
        help="whose error σ should rank: the dropout-free model's (the default prediction) or "
        "the MC mean's (uncertainty.prediction: mc_mean)",
    )
    parser.add_argument(
        "--mc-blocks",
        type=int,
        help="sample MC dropout only in the last N of the blocks trained with dropout "
        "(model.mc_dropout_blocks; default: the checkpoint's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    if args.mc_blocks is not None:
        for member in ckpt.models:
            member.set_mc_dropout_blocks(args.mc_blocks)
    dtype = next(ckpt.model.parameters()).dtype
    result: dict = {
        "checkpoint": args.checkpoint,
        "against": args.against,
        "mc_blocks": args.mc_blocks,
        "tests": {},
    }
    for item in args.test:
        name, _, path = item.partition("=")
        frames = read_labelled(path)
        graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, with_labels=True)
        f_ref = [g.forces_ref.numpy().astype(np.float64) for g in graphs]
        table: dict = {}
        for t in args.samples:
            for seed in args.seeds:
                pred = predict_dataset(ckpt.models, graphs, t, seed)
                predicted = pred.forces if args.against == "deterministic" else pred.forces_mean
                true_max = np.array(
                    [np.linalg.norm(f - r, axis=1).max() for f, r in zip(predicted, f_ref)]
                )
                table.setdefault("force_mae", {}).setdefault(f"T{t}", []).append(
                    round(
                        float(np.mean(np.abs(np.concatenate(predicted) - np.concatenate(f_ref)))), 5
                    )
                )
                per_atom = pred.forces_std()
                for key, score in summaries(per_atom, frames, args.radii).items():
                    row = table.setdefault(f"T{t}", {}).setdefault(
                        key, {"spearman": [], "auroc_top10": []}
                    )
                    row["spearman"].append(round(spearman(score, true_max), 4))
                    row["auroc_top10"].append(round(auroc_top_fraction(score, true_max, 0.1), 4))
        for key, per_t in table.items():
            if key == "force_mae":
                continue
            for row in per_t.values():
                row["spearman_mean"] = round(float(np.mean(row["spearman"])), 3)
                row["auroc_top10_mean"] = round(float(np.mean(row["auroc_top10"])), 3)
        result["tests"][name] = table
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
