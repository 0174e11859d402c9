"""One campaign round taken apart: is it the σ or the frames the walkers visited?

Takes a round of two finished campaigns (e.g. the MC-dropout and the ensemble campaign of
``benchmarks/label_efficiency.py``, which start from the same seed labels), labels *every*
frame their walkers visited in that round with the reference (xTB: seconds), and then

* scores each campaign's σ against the true error of its own round model on each pool
  (Spearman, AUROC of the top 10 %), and the pools' reference energies against the test sets;
* picks the round's budget from each pool by several rules (random; the shipped stratified
  rule with the MC σ, with the committee σ, with the true error as an oracle), trains the next
  round's model exactly as the campaign would (warm start from the first campaign's round
  model, ``round_config``), and scores it on the test sets.

    python benchmarks/round_study.py runs/bench/label_efficiency/mc_dropout_s0 \\
        runs/bench/label_efficiency/ensemble_s0 --round 1 \\
        --test 300K=datasets/ethanol_test_300K.extxyz --test 800K=datasets/ethanol_test_800K.extxyz

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from mlforce.calculators.reference import build_reference
from mlforce.campaign import RunDir, learned_descriptors, round_config, test_errors
from mlforce.checkpoint import load_checkpoint, save_checkpoint
from mlforce.data import graphs_from_frames, read_labelled
from mlforce.metrics import auroc_top_fraction, spearman
from mlforce.selection import random_selection, stratified_selection
from mlforce.store import LabelStore
from mlforce.train import train_models
from mlforce.uncertainty import predict_dataset


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def walker_frames(path: Path, walker: int) -> list:
    """The MD frames of one walker's trajectory (its start and guard frames excepted)."""
    frames = []
    for atoms in read(path, ":"):
        step = int(atoms.info.get("md_step", 0))
        if step > 0 and not str(atoms.info.get("decision", "")).startswith("guard"):
            atoms.info["walker"] = walker
            frames.append(atoms)
    return frames


def visited(run: RunDir, round_: int) -> list:
    frames = []
    for path in sorted(run.round_dir(round_).glob("walker_*.extxyz")):
        frames += walker_frames(path, int(path.stem.removeprefix("walker_")))
    return frames


def label(frames: list, reference) -> list:
    out = []
    for atoms in frames:
        calc = build_reference(reference, atoms)
        copy = atoms.copy()
        copy.calc = calc
        e, f = copy.get_potential_energy(), copy.get_forces()
        copy.calc = SinglePointCalculator(copy, energy=e, forces=f)
        copy.info = dict(atoms.info)
        out.append(copy)
    return out


def model_view(checkpoint: Path, frames: list, mc_samples: int) -> dict:
    """σ (max per-atom force std, raw) and the true max per-atom force error of the model."""
    ckpt = load_checkpoint(checkpoint)
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, True)
    pred = predict_dataset(ckpt.models, graphs, mc_samples=mc_samples)
    err = np.array(
        [np.linalg.norm(f - a.get_forces(), axis=1).max() for f, a in zip(pred.forces, frames)]
    )
    return {"sigma": pred.max_force_std(), "error": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs=2, help="two finished campaign run directories")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--budget", type=int, default=None, help="labels to pick (default: run)")
    parser.add_argument("--train-seeds", type=int, default=1)
    parser.add_argument("--out", default="runs/bench/round_study")
    args = parser.parse_args()
    tests = dict(item.split("=", 1) for item in args.test)
    start = time.perf_counter()
    runs = [RunDir(Path(r)) for r in args.runs]
    base = runs[0].config()
    k = args.round
    budget = args.budget or base.active_learning.labels_per_round
    result: dict = {"runs": args.runs, "round": k, "budget": budget, "pools": {}, "trials": []}

    test_e = np.concatenate([[a.get_potential_energy() for a in read_labelled(f)]
                             for f in tests.values()])  # fmt: skip
    pools = {}
    for run in runs:
        frames = label(visited(run, k), base.reference)
        pools[run.root.name] = frames
        e = np.array([a.get_potential_energy() for a in frames])
        views = {r.root.name: model_view(r.checkpoint(k), frames, base.uncertainty.mc_samples)
                 for r in runs}  # fmt: skip
        info = {
            "frames": len(frames),
            "energy_above_test_p99": float(np.mean(e > np.percentile(test_e, 99))),
            "energy_p50_p99": [float(np.percentile(e, 50)), float(np.percentile(e, 99))],
        }
        for name, v in views.items():
            info[name] = {
                "error_median": float(np.median(v["error"])),
                "error_max": float(v["error"].max()),
                "spearman": spearman(v["sigma"], v["error"]),
                "auroc_top10": auroc_top_fraction(v["sigma"], v["error"], 0.1),
            }
            for a, s, err in zip(frames, v["sigma"], v["error"]):
                a.info[f"sigma_{name}"] = float(s)
                a.info[f"error_{name}"] = float(err)
        result["pools"][run.root.name] = info
        log(json.dumps({run.root.name: info}))
    log(f"test energies p50/p99: {np.percentile(test_e, 50):.2f} {np.percentile(test_e, 99):.2f}")

    seed_labels, _ = LabelStore(runs[0].ledger).split(0.0, selection=f"iteration<{k}")
    warm = load_checkpoint(runs[0].checkpoint(k)).models
    first, other = (r.root.name for r in runs)
    for pool_name, frames in pools.items():
        descriptors = learned_descriptors(runs[0].checkpoint(k), frames)
        walkers = [int(a.info["walker"]) for a in frames]
        rules = {
            "random": random_selection(len(frames), budget, 7919 * k),
            f"sigma_{first}": stratified_selection(
                descriptors, [a.info[f"sigma_{first}"] for a in frames], walkers, budget, 7919 * k
            ),
            f"sigma_{other}": stratified_selection(
                descriptors, [a.info[f"sigma_{other}"] for a in frames], walkers, budget, 7919 * k
            ),
            "oracle_error": stratified_selection(
                descriptors, [a.info[f"error_{first}"] for a in frames], walkers, budget, 7919 * k
            ),
        }
        for rule, picks in rules.items():
            chosen = [frames[i] for i in picks]
            for seed in range(args.train_seeds):
                config = round_config(base, True).model_copy(deep=True)
                config.training.seed = base.training.seed + seed
                train, val = _split([*seed_labels, *chosen], base.active_learning.val_fraction)
                out = train_models(train, val, config, warm_start=warm, log=lambda m: None)
                path = save_checkpoint(Path(args.out) / f"{pool_name}_{rule}_{seed}", out.models)
                scores = test_errors(str(path), list(tests.values()))
                trial = {
                    "pool": pool_name,
                    "rule": rule,
                    "train_seed": seed,
                    "picked_error_median": float(
                        np.median([a.info[f"error_{first}"] for a in chosen])
                    ),
                    **{name: scores[Path(f).stem] for name, f in tests.items()},
                }
                result["trials"].append(trial)
                log(json.dumps(trial))
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))


def _split(frames: list, val_fraction: float) -> tuple[list, list]:
    from mlforce.store import split_frames

    train, val = split_frames(frames, val_fraction)
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val


if __name__ == "__main__":
    main()
