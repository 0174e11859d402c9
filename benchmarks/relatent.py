"""A trained checkpoint with its latent reference rebuilt at another size, recalibrated.

The latent reference (the training atoms' features that σ is combined with) is built after
training and does not change the weights, so a checkpoint from ``mlforce train`` can be given
another ``uncertainty.latent_atoms`` without training again: this rebuilds it from the same
training split (``mlforce train``'s seeded split of the config's data), refits the σ
calibration on the validation frames exactly as :func:`mlforce.train.train_models` does, and
writes a new checkpoint to score with ``mlforce evaluate``.

    python benchmarks/relatent.py runs/uq6/shipped/model.pt --max-per-element 6000 \\
        --out runs/uq6/latent6000

Prints JSON: the new checkpoint, its latent atoms per element and its calibration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mlforce.checkpoint import load_checkpoint, save_checkpoint
from mlforce.config import config_from_dict
from mlforce.data import graphs_from_frames, random_split, read_labelled
from mlforce.latent import LatentReference, atom_features
from mlforce.uncertainty import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--max-per-element", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    meta = ckpt.metadata
    config = config_from_dict(meta["config"], "checkpoint")
    frames = read_labelled(meta["data"])
    t = config.training
    train_idx, val_idx = random_split(len(frames), t.val_fraction, t.seed)
    dtype = next(ckpt.model.parameters()).dtype
    train = graphs_from_frames(
        [frames[i] for i in train_idx], ckpt.species, ckpt.cutoff, dtype, True
    )
    val = graphs_from_frames([frames[i] for i in val_idx], ckpt.species, ckpt.cutoff, dtype, True)
    latent = LatentReference.build(
        atom_features(ckpt.model, train),
        [g.numbers.numpy() for g in train],
        max_per_element=args.max_per_element,
        seed=t.seed,
    )
    u = config.for_training_frames(len(frames)).uncertainty
    calibration = calibrate(ckpt.models, val, u.mc_samples, u.seed, u.calibration, latent=latent)
    calibration["mc_samples"] = u.mc_samples
    calibration["latent_atoms"] = latent.n_points
    if ckpt.local_radius:
        calibration["local_radius"] = ckpt.local_radius
    meta = {**meta, "relatent": {"from": args.checkpoint, "max_per_element": args.max_per_element}}
    path = save_checkpoint(Path(args.out), ckpt.models, calibration=calibration, latent=latent,
                           metadata=meta)  # fmt: skip
    per_element = {z: len(p) for z, p in latent.points.items()}
    print(json.dumps({"checkpoint": str(path), "latent_atoms": per_element,
                      "calibration": calibration}))  # fmt: skip


if __name__ == "__main__":
    main()
