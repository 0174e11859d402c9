"""Which labels teach more, with the learner held fixed: replay campaigns' label sets.

For each finished campaign, trains one model (the campaign config plus ``--set`` overrides,
e.g. no dropout) on the labels the campaign had before each round, with the campaign's own
schedule (round 1 from scratch, later rounds warm-started for ``round_epochs``), and scores it
on the test sets. Two campaigns replayed with the same learner differ only in their labels:
this separates "σ chose better frames" from "the campaign's model learns more per label".

    python benchmarks/replay_labels.py runs/bench/label_efficiency/mc_dropout_s0 \\
        runs/bench/label_efficiency/ensemble_s0 --set model.node_dropout=0 \\
        --set model.edge_dropout=0 --set training.ensemble=1 \\
        --test 300K=datasets/ethanol_test_300K.extxyz --test 800K=datasets/ethanol_test_800K.extxyz

Prints JSON: per campaign, (labels, {test: force MAE eV/Å}) for each replayed round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlforce.campaign import RunDir, round_config, test_errors
from mlforce.checkpoint import save_checkpoint
from mlforce.cli import _parse_overrides
from mlforce.config import apply_overrides, config_from_dict
from mlforce.store import LabelStore
from mlforce.train import train_models


def replay(
    run_dir: Path, overrides: dict, tests: dict[str, str], work: Path, models: int | None = None
) -> list:
    run = RunDir(run_dir)
    base = run.config()
    config = config_from_dict(apply_overrides(base.model_dump(), overrides), "replay")
    state = run.state()
    store = LabelStore(run.ledger)
    val_fraction = base.active_learning.val_fraction
    curve, previous = [], None
    last = len(state["rounds"]) + 1 if models is None else min(models, len(state["rounds"]) + 1)
    for k in range(1, last + 1):  # each round's model, then the final one
        train, val = store.split(val_fraction, selection=f"iteration<{k}")
        if not val:
            val, train = train[-1:], train[:-1]
        final = k == len(state["rounds"]) + 1
        cfg = round_config(config, previous is not None, final)
        result = train_models(train, val, cfg, warm_start=previous, log=lambda m: None)
        previous = result.models
        path = save_checkpoint(work / f"round_{k:03d}", result.models)
        scores = test_errors(str(path), list(tests.values()))
        n = len(train) + len(val)
        curve.append((n, {name: scores[Path(f).stem] for name, f in tests.items()}))
        print(f"{run_dir.name}: {n} labels -> {curve[-1][1]}", file=sys.stderr, flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="finished campaign run directories")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="learner override")
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--out", default="runs/bench/replay")
    parser.add_argument("--models", type=int, help="replay only the first N round models")
    args = parser.parse_args()
    tests = dict(item.split("=", 1) for item in args.test)
    overrides = _parse_overrides(args.set)
    start = time.perf_counter()
    result = {"overrides": overrides, "date": time.strftime("%Y-%m-%d"), "campaigns": {}}
    for run in args.runs:
        work = Path(args.out) / Path(run).name
        work.mkdir(parents=True, exist_ok=True)
        result["campaigns"][Path(run).name] = replay(Path(run), overrides, tests, work, args.models)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
