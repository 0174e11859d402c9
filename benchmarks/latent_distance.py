"""A second cheap signal beside MC-dropout σ: distance to the training data in the model's features.

For every atom, the distance from its learned invariant features (:meth:`ForceField.atom_features`,
standardised) to the nearest training atom of the same element; per structure the maximum, or
the maximum of its mean over each atom's neighbours within 3 Å (as for σ). Scored against the
true largest per-atom force error of the dropout-free model, alone and combined with σ by the
sum of ranks (the combination that needs no common unit), T = 16, mask seeds 0-2:

    python benchmarks/latent_distance.py CHECKPOINT --train datasets/ethanol_train.extxyz \\
        --test 300K=datasets/ethanol_test_300K.extxyz --test 800K=datasets/ethanol_test_800K.extxyz

Prints JSON: per test set and signal, Spearman and AUROC (worst 10 %), mean and per seed.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from scipy.stats import rankdata

from mlforce.checkpoint import load_checkpoint
from mlforce.data import graphs_from_frames, read_labelled
from mlforce.latent import LatentReference, atom_features, local_max
from mlforce.metrics import auroc_top_fraction, spearman
from mlforce.uncertainty import predict_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--train", required=True, help="the frames the model was trained on")
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--max-per-element", type=int, default=None, help="subsample the training atoms"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.models[0]
    dtype = next(model.parameters()).dtype

    def graphs(frames):
        return graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, with_labels=True)

    train = read_labelled(args.train)
    reference = LatentReference.build(
        atom_features(model, graphs(train)),
        [a.numbers for a in train],
        max_per_element=args.max_per_element,
    )
    result: dict = {
        "checkpoint": args.checkpoint,
        "train": args.train,
        "max_per_element": args.max_per_element,
        "tests": {},
    }
    for item in args.test:
        name, _, path = item.partition("=")
        frames = read_labelled(path)
        test_graphs = graphs(frames)
        distance = [
            reference.distance(f, atoms.numbers)
            for atoms, f in zip(frames, atom_features(model, test_graphs))
        ]
        latent_max = np.array([d.max() for d in distance])
        latent_3a = np.array([local_max(d, a.positions, 3.0) for d, a in zip(distance, frames)])
        f_ref = [g.forces_ref.numpy() for g in test_graphs]
        table: dict = {}
        for seed in args.seeds:
            pred = predict_dataset(ckpt.models, test_graphs, args.samples, seed)
            true = np.array(
                [np.linalg.norm(f - r, axis=1).max() for f, r in zip(pred.forces, f_ref)]
            )
            sigma_3a = np.array(
                [local_max(s, a.positions, 3.0) for s, a in zip(pred.forces_std(), frames)]
            )
            signals = {
                "sigma_3A": sigma_3a,
                "latent_max": latent_max,
                "latent_3A": latent_3a,
                "ranks_sigma_3A+latent_3A": rankdata(sigma_3a) + rankdata(latent_3a),
                "ranks_sigma_3A+latent_max": rankdata(sigma_3a) + rankdata(latent_max),
                # a product has a unit (eV/Å once scaled) and ranks like log σ + log d
                "geometric_mean_sigma_3A_latent_3A": np.sqrt(sigma_3a * latent_3a),
                # per atom first (what a calculator can report per atom), then the 3 Å max
                "per_atom_geometric_3A": np.array(
                    [
                        local_max(np.sqrt(s * d), a.positions, 3.0)
                        for s, d, a in zip(pred.forces_std(), distance, frames)
                    ]
                ),
            }
            for key, value in signals.items():
                row = table.setdefault(key, {"spearman": [], "auroc_top10": []})
                row["spearman"].append(round(spearman(value, true), 4))
                row["auroc_top10"].append(round(auroc_top_fraction(value, true, 0.1), 4))
        for row in table.values():
            row["spearman_mean"] = round(float(np.mean(row["spearman"])), 3)
            row["auroc_top10_mean"] = round(float(np.mean(row["auroc_top10"])), 3)
        result["tests"][name] = table
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
