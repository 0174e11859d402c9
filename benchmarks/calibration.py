"""Likelihood vs robust (median) calibration scale: fitted and scored on the same data.

Prints one JSON object: both scales, the miscalibration area each gives (per force component),
and quantiles of |error| / σ. DATA is a labelled extxyz file or a ledger (its validation split).

    python benchmarks/calibration.py runs/bench/mc datasets/ethanol_test_300K.extxyz
    python benchmarks/calibration.py runs/demo/round_005 runs/demo/labels.db
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mlforce.checkpoint import load_checkpoint
from mlforce.data import graphs_from_frames, read_labelled
from mlforce.metrics import miscalibration_area
from mlforce.store import LabelStore
from mlforce.uncertainty import fit_calibration, predict_dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("data", help="labelled extxyz, or a ledger (.db): its validation split")
    parser.add_argument("--mc-samples", type=int, default=16)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    if args.data.endswith(".db"):
        _, frames = LabelStore(args.data).split(args.val_fraction)
    else:
        frames = read_labelled(args.data)
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, with_labels=True)
    pred = predict_dataset(ckpt.models, graphs, args.mc_samples, 0)
    errors = np.concatenate(
        [f - g.forces_ref.double().numpy() for f, g in zip(pred.forces, graphs)]
    )
    std = np.concatenate(pred.forces_std_xyz)
    levels = [50, 90, 99, 99.9, 100]
    quantiles = np.percentile(np.abs(errors) / std, levels).round(3).tolist()
    out: dict = {"frames": len(graphs), "ratio_quantiles": dict(zip(map(str, levels), quantiles))}
    for method in ("scale", "robust"):
        s = fit_calibration(errors, std, method=method)["scale"]
        out[method] = {"scale": s, "miscalibration_area": miscalibration_area(errors, s * std)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
