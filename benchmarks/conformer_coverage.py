"""Which ethanol conformers a campaign's walkers visit and label, and whether σ sees the new one.

The shipped 300 K test trajectories are all gauche (H-O-C-C torsion away from 180°); the seed
labels (500 K xTB MD from data/ethanol.xyz) are all trans. For each campaign run directory:

* ``visited_gauche``: per round, the gauche fraction of each walker's trajectory;
* ``labels_gauche``: the gauche fraction of the first ``--labels`` labels (ledger order);
* ``sigma_ratio``: round 1's model on its walkers' frames (every 2nd): median gauche / median
  trans of σ_MC (raw max over atoms; for a committee, its spread), and, for a checkpoint with a
  latent reference, of the latent distance (max over atoms and the hydroxyl H's) and of the
  combined σ;
* with ``--retrain EPOCHS``: one dropout model of ``--config`` trained from scratch on those
  labels and scored on ``--test`` files (force MAE, eV/Å): the labels' worth apart from the
  campaign's own learner. ``pool_sN`` names a reference-MD pool of label_efficiency.py (the seed
  labels plus its first picks, in its own order).

    python benchmarks/conformer_coverage.py runs/bench/le_sl/{mc_sigma_latent,ensemble}_s{0..5} \
        --retrain 300 --test datasets/indep/ethanol_test_300K.extxyz > coverage.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def torsion(atoms) -> float:
    """H-O-C-C torsion (degrees, 0-360) of ethanol as data/ethanol.xyz orders it (C, C, O, H...):
    the hydroxyl H is the H nearest the O."""
    o = int(np.flatnonzero(atoms.numbers == 8)[0])
    hs = np.flatnonzero(atoms.numbers == 1)
    h = int(hs[np.argmin(atoms.get_distances(o, hs))])
    cs = np.flatnonzero(atoms.numbers == 6)
    c_o = int(cs[np.argmin(atoms.get_distances(o, cs))])
    c_far = int(next(c for c in cs if c != c_o))
    return float(atoms.get_dihedral(h, o, c_o, c_far))


def is_gauche(atoms) -> bool:
    return abs(torsion(atoms) - 180.0) >= 60.0


def hydroxyl_h(atoms) -> int:
    o = int(np.flatnonzero(atoms.numbers == 8)[0])
    hs = np.flatnonzero(atoms.numbers == 1)
    return int(hs[np.argmin(atoms.get_distances(o, hs))])


def label_frames(run: Path, count: int) -> list:
    from ase.io import read

    from mlforce.store import LabelStore

    name = run.name
    if name.startswith("pool_s"):
        seed = int(name.removeprefix("pool_s"))
        seeds = read(run.parent / "seed_labels.extxyz", ":")
        pool = read(run / "reference_pool.extxyz", ":")
        order = np.random.default_rng(seed).permutation(len(pool))
        return seeds + [pool[i] for i in order[: count - len(seeds)]]
    rows = LabelStore(run / "labels.db").atoms(status="ok")
    rows.sort(key=lambda a: (a.info.get("iteration", 0), a.info["id"]))
    return rows[:count]


def sigma_ratio(run: Path) -> dict[str, float]:
    from ase.io import read

    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.latent import atom_features
    from mlforce.uncertainty import predict_dataset

    rdir = run / "round_001"
    ckpt = load_checkpoint(rdir / "model.pt")
    frames = [a for w in sorted(rdir.glob("walker_*.extxyz")) for a in read(w, "::2")]
    gauche = np.array([is_gauche(a) for a in frames])
    if not gauche.any() or gauche.all():
        return {"frames": len(frames), "gauche": int(gauche.sum())}
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, False)
    pred = predict_dataset(ckpt.models, graphs, 16, 0)
    signals = {"sigma_mc": np.array([s.max() for s in pred.forces_std()])}
    if ckpt.latent is not None and not ckpt.is_ensemble:
        feats = atom_features(ckpt.model, graphs)
        d = [ckpt.latent.distance(f, g.numbers.numpy()) for f, g in zip(feats, graphs)]
        signals["latent_max"] = np.array([x.max() for x in d])
        signals["latent_hydroxyl_h"] = np.array([x[hydroxyl_h(a)] for x, a in zip(d, frames)])
        signals["combined"] = np.array([np.sqrt(s * x).max() for s, x in zip(pred.forces_std(), d)])
    out: dict[str, float] = {"frames": len(frames), "gauche": int(gauche.sum())}
    for name, v in signals.items():
        out[name] = float(np.median(v[gauche]) / np.median(v[~gauche]))
    return out


def retrain(frames: list, config: str, epochs: int, tests: list[str], out: Path) -> dict:
    from mlforce.campaign import test_errors
    from mlforce.checkpoint import save_checkpoint
    from mlforce.config import load_config
    from mlforce.store import split_frames
    from mlforce.train import train_models

    cfg = load_config(config)
    cfg.training.max_epochs, cfg.training.max_minutes = epochs, 600
    train, val = split_frames(frames, cfg.active_learning.val_fraction)
    result = train_models(train, val or train[-1:], cfg, log=lambda m: None)
    path = save_checkpoint(out, result.models)
    return test_errors(str(path), tests)


def main() -> None:
    from ase.io import read

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--labels", type=int, default=130, help="first labels counted / retrained")
    p.add_argument("--retrain", type=int, default=0, metavar="EPOCHS")
    p.add_argument("--config", default="configs/ethanol_xtb.yaml")
    p.add_argument("--test", action="append", default=[])
    p.add_argument("--work", type=Path, default=Path("runs/coverage"))
    args = p.parse_args()
    result = {"tests_gauche": {t: float(np.mean([is_gauche(a) for a in read(t, ":")]))
                               for t in args.test}}  # fmt: skip
    for run in args.runs:
        frames = label_frames(run, args.labels)
        entry: dict = {
            "labels": len(frames),
            "labels_gauche": float(np.mean([is_gauche(a) for a in frames])),
        }
        if not run.name.startswith("pool_s"):
            entry["visited_gauche"] = {
                rdir.name: [float(np.mean([is_gauche(a) for a in read(w, ":")]))
                            for w in sorted(rdir.glob("walker_*.extxyz"))]
                for rdir in sorted(run.glob("round_*")) if any(rdir.glob("walker_*.extxyz"))
            }  # fmt: skip
            entry["sigma_ratio"] = sigma_ratio(run)
        if args.retrain:
            args.work.mkdir(parents=True, exist_ok=True)
            entry["retrained_force_mae"] = retrain(
                frames, args.config, args.retrain, args.test, args.work / f"{run.name}.pt"
            )
        result[str(run)] = entry
        print(f"{run}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
