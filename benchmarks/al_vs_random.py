"""Active learning against random sampling, from the same seed labels.

Reads a finished campaign (its rounds, seed labels and test scores), then repeats its training
schedule (round 1 from scratch, later rounds warm-started with ``round_epochs``) on labels
drawn **at random** from a GFN2-xTB MD pool of the same simulated time at the same
temperatures: each random model has as many labels as the campaign's model at that point
(round k's model saw the labels of rounds before k; the final model all of them). Prints
one JSON object: both learning curves (test force MAE vs labels) and the labels each needs to
reach the target MAE (or the lowest level both reach).

    mlforce demo --out runs/demo                     # or any finished campaign
    python benchmarks/al_vs_random.py runs/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from mlforce.campaign import RunDir, round_config, test_errors
from mlforce.checkpoint import load_checkpoint, save_checkpoint
from mlforce.generate import reference_md
from mlforce.md import load_start_structure
from mlforce.store import LabelStore, split_frames
from mlforce.train import train_models


def xtb_pool(config, total_fs: float, out: Path) -> list:
    """Reference MD frames (every 10 fs) at the campaign's temperatures, same simulated time."""
    from ase.io import read, write

    if out.is_file():
        return read(out, ":")
    gen = config.data.generate.model_copy(update={"interval": 20, "equilibration_steps": 200})
    per_walker = int(total_fs / (gen.interval * gen.timestep_fs)) // len(config.md.temperatures)
    frames = []
    for s, path in enumerate(config.md.structures):
        start = load_start_structure(path)
        for t, temperature in enumerate(config.md.temperatures):
            frames += reference_md(start, config.reference, temperature, per_walker, gen,
                                   seed=777 + 10 * s + t)  # fmt: skip
    write(out, frames, format="extxyz")
    return frames


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((n for n, mae in curve if mae <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--target", type=float, default=0.05, help="force MAE (eV/Å)")
    parser.add_argument("--test", default="ethanol_test_300K", help="test set name to compare")
    args = parser.parse_args()
    run = RunDir(Path(args.run_dir))
    config = run.config()
    state = run.state()
    rounds = state["rounds"]
    store = LabelStore(run.ledger)
    seeds = store.atoms(status="ok", trigger="seed")
    total_fs = 1000 * sum(r["simulated_ps"] for r in rounds)
    work = run.root / "random_baseline"
    work.mkdir(exist_ok=True)
    pool = xtb_pool(config, total_fs, work / "xtb_pool.extxyz")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool))
    tests = config.active_learning.test_files
    al_curve, random_curve = [], []
    previous = None
    start = time.perf_counter()
    # round k's model was trained on the labels of rounds < k; the final model on all of them
    points = [(row["labels_total"] - row["labels_added"], row.get("test_force_mae") or {})
              for row in rounds]  # fmt: skip
    points.append((state["labels_total"], state.get("final_test_force_mae") or {}))
    for k, (n_labels, al_scores) in enumerate(points, start=1):
        n_new = max(0, n_labels - len(seeds))
        chosen = seeds + [pool[i] for i in order[:n_new]]
        val_frac = config.active_learning.val_fraction
        train, val = split_frames(chosen, val_frac)
        val = val or train[-1:]
        cfg = round_config(config, previous is not None)
        result = train_models(train, val, cfg, warm_start=previous, log=lambda m: None)
        previous = result.models
        path = save_checkpoint(work / f"round_{k:03d}", result.models)
        scores = test_errors(str(path), tests)
        random_curve.append((len(chosen), scores))
        al_curve.append((n_labels, al_scores))
        print(f"round {k}: {len(chosen)} labels, random {scores}, active {al_curve[-1][1]}",
              file=sys.stderr, flush=True)  # fmt: skip
    pick = args.test

    def series(curve):
        return [(n, s[pick]) for n, s in curve if pick in s]

    al, rnd = series(al_curve), series(random_curve)
    common = max(min(m for _, m in al), min(m for _, m in rnd)) if al and rnd else None
    print(json.dumps({
        "run_dir": str(run.root), "date": time.strftime("%Y-%m-%d"),
        "pool_frames": len(pool), "pool_simulated_fs": total_fs, "test_set": pick,
        "active_learning": al_curve, "random": random_curve,
        "target_force_mae": args.target,
        "labels_to_target": {"active_learning": labels_to_reach(al, args.target),
                             "random": labels_to_reach(rnd, args.target)},
        "lowest_common_mae": common,
        "labels_to_lowest_common": {"active_learning": labels_to_reach(al, common or 0),
                                    "random": labels_to_reach(rnd, common or 0)},
        "seconds": time.perf_counter() - start,
        "checkpoint_of_last_random_round": str(path),
        "random_model_species": load_checkpoint(path).species,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
