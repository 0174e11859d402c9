"""Uncertainty quality: MC dropout against a deep ensemble on the same data and architecture.

Prints one JSON object. For each test set (300 K and 800 K xTB ethanol trajectories, and an
out-of-domain xTB malonaldehyde trajectory generated here) and each method: force MAE of the
prediction, Spearman of max_force_std vs the true max per-atom force error, ROC-AUC for the 10%
worst structures, miscalibration area (calibrated), and inference time per structure. MC
dropout is scored for several T and several mask seeds (its ranking depends on the mask set:
the spread is part of the answer).

    mlforce train configs/ethanol_xtb.yaml --out runs/bench/mc --set training.threads=1
    mlforce train configs/ethanol_xtb.yaml --out runs/bench/ensemble --ensemble 4 \\
        --set model.node_dropout=0 --set model.edge_dropout=0 --set training.threads=1
    python benchmarks/uq_quality.py --mc runs/bench/mc --ensemble runs/bench/ensemble
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mlforce.checkpoint import load_checkpoint
from mlforce.config import ReferenceConfig, load_config
from mlforce.data import graphs_from_frames, read_labelled, read_structures
from mlforce.evaluate import uncertainty_metrics
from mlforce.metrics import auroc
from mlforce.uncertainty import predict_dataset

KEYS = ("force_mae", "force_mae_mc_mean", "spearman_max_force", "auroc_top10",
        "miscalibration_area", "mean_max_force_std", "inference_ms_per_structure")  # fmt: skip


def ood_set(path: Path, frames: int) -> Path:
    """An xTB Langevin trajectory of malonaldehyde at 300 K (generated once)."""
    if path.is_file():
        return path
    from ase.io import write

    from mlforce.generate import reference_md

    gen = load_config("configs/ethanol_xtb.yaml").data.generate
    start = read_structures("data/malonaldehyde.xyz")[0]
    out = reference_md(start, ReferenceConfig(), 300.0, frames, gen, seed=2024)
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, out, format="extxyz")
    return path


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)),
            "max": float(np.max(values))}  # fmt: skip


def score(models, calibration, graphs, t: int, seed: int) -> dict:
    pred = predict_dataset(models, graphs, t, seed)
    m = uncertainty_metrics(pred, graphs, calibration)
    return {**{k: m[k] for k in KEYS}, "_sigma": pred.max_force_std(calibration)}


def recalibrate(ckpt, config_path: str) -> dict:
    """Refit the MC calibration on the validation split the checkpoint was trained with."""
    from mlforce.data import random_split
    from mlforce.uncertainty import calibrate

    config = load_config(config_path)
    frames = read_labelled(config.data.train)
    _, val_idx = random_split(len(frames), config.training.val_fraction, config.training.seed)
    graphs = graphs_from_frames([frames[i] for i in val_idx], ckpt.species, ckpt.cutoff,
                                torch.float32, True)  # fmt: skip
    u = config.uncertainty
    return calibrate([ckpt.model], graphs, u.mc_samples, u.seed, u.calibration)


def ood_auroc(in_domain: np.ndarray, out_of_domain: np.ndarray) -> float:
    """ROC-AUC of max_force_std for telling out-of-domain structures from in-domain ones."""
    score_ = np.concatenate([in_domain, out_of_domain])
    positive = np.r_[np.zeros(len(in_domain), bool), np.ones(len(out_of_domain), bool)]
    return auroc(score_, positive)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mc", required=True, help="MC-dropout checkpoint (dir or model.pt)")
    parser.add_argument("--ensemble", required=True, help="committee checkpoint")
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--samples", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--mc-blocks", type=int, default=None,
                        help="MC dropout only in the last N blocks; recalibrated on the "
                        "checkpoint's validation split")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mc, ens = load_checkpoint(args.mc), load_checkpoint(args.ensemble)
    if args.mc_blocks is not None:
        mc.model.set_mc_dropout_blocks(args.mc_blocks)
        mc.calibration = recalibrate(mc, args.config)
    sets = {
        "300K": Path("datasets/ethanol_test_300K.extxyz"),
        "800K": Path("datasets/ethanol_test_800K.extxyz"),
        "malonaldehyde_300K": ood_set(Path("datasets/malonaldehyde_test_300K.extxyz"), 100),
    }
    out: dict = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "mc_training_seconds": mc.metadata.get("training", {}).get("seconds"),
        "ensemble_training_seconds": ens.metadata.get("training", {}).get("seconds"),
        "mc_calibration": mc.calibration,
        "mc_dropout_blocks": args.mc_blocks,
        "ensemble_calibration": ens.calibration,
    }
    sigmas: dict = {}
    for name, path in sets.items():
        frames = read_labelled(path)
        graphs = graphs_from_frames(frames, mc.species, mc.cutoff, torch.float32, True)
        ens_score = score(ens.models, ens.calibration, graphs, 2, 0)
        sigmas[(name, "ensemble")] = [ens_score.pop("_sigma")]
        row: dict = {"n_configs": len(frames), "ensemble": ens_score}
        for t in args.samples:
            runs = [score(mc.models, mc.calibration, graphs, t, s) for s in args.seeds]
            sigmas[(name, f"mc_T{t}")] = [r.pop("_sigma") for r in runs]
            row[f"mc_T{t}"] = {k: _spread([r[k] for r in runs]) for k in KEYS}
        out[name] = row
    # out of domain: does σ tell malonaldehyde from ethanol at 300 K?
    out["ood_auroc_malonaldehyde_vs_300K"] = {
        method: _spread([ood_auroc(a, b) for a, b in zip(sigmas[("300K", method)],
                                                         sigmas[("malonaldehyde_300K", method)])])
        for method in ["ensemble"] + [f"mc_T{t}" for t in args.samples]
    }  # fmt: skip
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
