"""Which walkers make the better pool? Same MD budget, different starts and lengths.

Takes round ``k`` of a finished campaign (its round model and the labels it had), runs the
round's walkers again under several schemes with the same total number of MD steps, labels
*every* frame they visited with the reference (xTB: seconds), and trains the next round's
model on the round's budget picked from each pool (random; the shipped stratified MC-σ rule),
exactly as the campaign would (warm start, ``round_config``). Schemes:

* ``long``: one walker per temperature from the start structure, ``md.steps`` each (the
  campaign's scheme, run again here with fresh seeds);
* ``short_labelled``: ``--walkers`` walkers per temperature, ``md.steps / walkers`` steps each,
  each starting from a labelled frame drawn at random from the ledger;
* ``short_seed_labels``: the same, drawn from the seed labels (reference MD) only;
* ``reference_long``: the ``long`` walkers driven by the reference itself.

    python benchmarks/pool_schemes.py runs/bench/le2/mc_dropout_s0 --round 1 \\
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

sys.path.insert(0, str(Path(__file__).parent))
from round_study import _split, label, log, model_view, walker_frames

from mlforce.calculators.ml import MLForceCalculator
from mlforce.campaign import RunDir, learned_descriptors, round_config, test_errors
from mlforce.checkpoint import checkpoint_hash, load_checkpoint, save_checkpoint
from mlforce.data import read_labelled
from mlforce.md import load_start_structure, run_walker
from mlforce.selection import random_selection, stratified_selection
from mlforce.store import LabelStore
from mlforce.train import train_models


def run_pool(run: RunDir, k: int, starts: list, temperatures: list, steps: int, out: Path,
             seed: int) -> list:  # fmt: skip
    config = run.config()
    md = config.md.model_copy(deep=True)
    md.triggers.mode = "collect"
    u = config.uncertainty
    calc = MLForceCalculator(run.checkpoint(k), mc_samples=u.mc_samples, seed=u.seed)
    frames = []
    for w, (atoms, temperature) in enumerate(zip(starts, temperatures)):
        path = out / f"walker_{w}.extxyz"
        run_walker(calc, atoms, temperature, md, seed=seed + w, walker=w, iteration=k,
                   steps=steps, model_hash="m-" + checkpoint_hash(run.checkpoint(k)),
                   trajectory=path, candidates=[])  # fmt: skip
        frames += walker_frames(path, w)
    return frames


def reference_pool(config, starts: list, temperatures: list, steps: int, seed: int) -> list:
    """The same walkers driven by the reference itself: frames every ``trajectory_every``."""
    from mlforce.calculators.reference import build_reference
    from mlforce.md import _thermalize, make_dynamics

    frames = []
    for w, (atoms, temperature) in enumerate(zip(starts, temperatures)):
        rng = np.random.default_rng(seed + w)
        atoms.calc = build_reference(config.reference, atoms)
        _thermalize(atoms, temperature, rng)
        dyn = make_dynamics(atoms, config.md, temperature, rng)
        for _ in range(steps // config.md.trajectory_every):
            dyn.run(config.md.trajectory_every)
            frame = atoms.copy()
            frame.info = {"walker": w}
            frames.append(frame)
    return frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="finished campaign run directory")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--walkers", type=int, default=4, help="walkers per temperature (short)")
    parser.add_argument("--md-seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--schemes", nargs="+", default=None, help="default: all")
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--out", default="runs/bench/pool_schemes")
    args = parser.parse_args()
    tests = dict(item.split("=", 1) for item in args.test)
    start = time.perf_counter()
    run = RunDir(Path(args.run))
    base = run.config()
    k = args.round
    budget = base.active_learning.labels_per_round
    temps = list(base.md.temperatures)
    labelled, _ = LabelStore(run.ledger).split(0.0, selection=f"iteration<{k}")
    warm = load_checkpoint(run.checkpoint(k)).models
    test_e = np.concatenate([[a.get_potential_energy() for a in read_labelled(f)]
                             for f in tests.values()])  # fmt: skip
    result: dict = {"run": args.run, "round": k, "budget": budget, "trials": []}
    for md_seed in args.md_seeds:
        rng = np.random.default_rng([md_seed, k])
        n = args.walkers
        schemes = {
            "long": ([load_start_structure(base.md.structures[0]) for _ in temps], temps,
                     base.md.steps),
            "reference_long": (
                [load_start_structure(base.md.structures[0]) for _ in temps], temps,
                base.md.steps,
            ),
            "short_labelled": (
                [labelled[i].copy() for i in rng.choice(len(labelled), n * len(temps))],
                [t for t in temps for _ in range(n)], base.md.steps // n,
            ),
        }  # fmt: skip
        seeds_only = [a for a in labelled if int(a.info.get("iteration", 0)) == 0]
        schemes["short_seed_labels"] = (
            [seeds_only[i].copy() for i in rng.choice(len(seeds_only), n * len(temps))],
            [t for t in temps for _ in range(n)],
            base.md.steps // n,
        )
        for name, (starts, temperatures, steps) in schemes.items():
            if args.schemes and name not in args.schemes:
                continue
            for a in starts:
                a.calc = None
                a.info = {}
            out = Path(args.out) / f"{run.root.name}_r{k}_s{md_seed}_{name}"
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            seed = 10_000 * (md_seed + 1)
            if name.startswith("reference"):
                frames = reference_pool(base, starts, temperatures, steps, seed)
            else:
                frames = run_pool(run, k, starts, temperatures, steps, out, seed)
            frames = label(frames, base.reference)
            md_seconds = time.perf_counter() - t0
            view = model_view(run.checkpoint(k), frames, base.uncertainty.mc_samples)
            e = np.array([a.get_potential_energy() for a in frames])
            descriptors = learned_descriptors(run.checkpoint(k), frames)
            walkers = [int(a.info["walker"]) for a in frames]
            rules = {
                "random": random_selection(len(frames), budget, 7919 * k),
                "mc_sigma": stratified_selection(
                    descriptors, view["sigma"], walkers, budget, 7919 * k
                ),
            }
            for rule, picks in rules.items():
                chosen = [frames[i] for i in picks]
                config = round_config(base, True)
                train, val = _split([*labelled, *chosen], base.active_learning.val_fraction)
                trained = train_models(train, val, config, warm_start=warm, log=lambda m: None)
                path = save_checkpoint(out / f"model_{rule}", trained.models)
                scores = test_errors(str(path), list(tests.values()))
                trial = {
                    "md_seed": md_seed, "scheme": name, "rule": rule, "frames": len(frames),
                    "md_seconds": md_seconds,
                    "energy_above_test_p99": float(np.mean(e > np.percentile(test_e, 99))),
                    "error_median": float(np.median(view["error"])),
                    **{t: scores[Path(f).stem] for t, f in tests.items()},
                }  # fmt: skip
                result["trials"].append(trial)
                log(json.dumps(trial))
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
