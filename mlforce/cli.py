"""The ``mlforce`` command line.

Every user-facing error is one line ``error: ...`` on stderr and exit status 2, no traceback.
Progress goes to stderr; ``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mlforce.errors import MlforceError


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise MlforceError(f"--set expects KEY=VALUE (dotted key), got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    from mlforce.config import load_config
    from mlforce.generate import generate_datasets

    config = load_config(args.config, _parse_overrides(args.set))
    paths = generate_datasets(config, args.out, log=_log)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def run_training(config_path: str, data: list[str] | None, out: str, overrides: dict) -> dict:
    """Train on extxyz files and write ``out/model.pt``; returns the training metrics."""
    from mlforce.checkpoint import save_checkpoint
    from mlforce.config import load_config
    from mlforce.data import random_split, read_labelled
    from mlforce.train import train_models

    config = load_config(config_path, overrides)
    files = data or config.data.train
    frames = read_labelled(files)
    train_idx, val_idx = random_split(
        len(frames), config.training.val_fraction, config.training.seed
    )
    train_frames = [frames[i] for i in train_idx]
    val_frames = [frames[i] for i in val_idx]
    result = train_models(train_frames, val_frames, config, log=_log)
    path = save_checkpoint(
        Path(out),
        result.models,
        calibration=result.calibration,
        metadata={
            "config": config.model_dump(),
            "training": result.metrics,
            "data": [str(f) for f in files],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    _log(f"checkpoint written: {path}")
    return {**result.metrics, "checkpoint": str(path)}


def cmd_train(args: argparse.Namespace) -> int:
    overrides = _parse_overrides(args.set)
    if args.ensemble is not None:
        overrides["training.ensemble"] = args.ensemble
    metrics = run_training(args.config, args.data, args.out, overrides)
    if args.json:
        print(json.dumps(metrics))
    return 0


def run_evaluation(
    checkpoint: str, data: str, mc_samples: int | None = None, seed: int | None = None
) -> dict:
    """Metrics of a checkpoint on a labelled structure file.

    Always: the deterministic model's errors (a committee's mean). With ``mc_samples`` (or a
    committee checkpoint) also the uncertainty quality: ``spearman_max_force``,
    ``auroc_top10``, ``miscalibration_area`` (calibrated) and ``mean_max_force_std``.
    """
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames, read_labelled
    from mlforce.evaluate import evaluate_graphs, uncertainty_metrics
    from mlforce.uncertainty import predict_dataset

    ckpt = load_checkpoint(checkpoint)
    frames = read_labelled(data)
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, with_labels=True)
    if mc_samples is None and not ckpt.is_ensemble:
        return evaluate_graphs(ckpt.model, graphs)
    if mc_samples is not None and mc_samples < 2 and not ckpt.is_ensemble:
        raise MlforceError(f"--mc-samples must be at least 2 for an uncertainty, got {mc_samples}")
    if not ckpt.is_ensemble and not ckpt.model.has_dropout:
        raise MlforceError(f"{ckpt.path}: the model has no dropout, so MC sampling gives no spread")
    seed = 0 if seed is None else seed
    pred = predict_dataset(ckpt.models, graphs, mc_samples or 16, seed)
    metrics = uncertainty_metrics(pred, graphs, ckpt.calibration)
    metrics["uncertainty"] = "committee" if ckpt.is_ensemble else f"mc_dropout T={mc_samples}"
    return metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = run_evaluation(args.checkpoint, args.data, args.mc_samples, args.seed)
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"configurations       {metrics['n_configs']}")
    print(f"energy MAE           {1000 * metrics['energy_mae_per_atom']:.3f} meV/atom")
    print(f"force MAE            {metrics['force_mae']:.4f} eV/Å")
    print(f"force RMSE           {metrics['force_rmse']:.4f} eV/Å")
    if "spearman_max_force" in metrics:
        print(f"uncertainty          {metrics['uncertainty']} ({metrics['calibration']})")
        print(f"Spearman max force   {metrics['spearman_max_force']:.3f}")
        print(f"AUROC top 10%        {metrics['auroc_top10']:.3f}")
        print(f"miscalibration area  {metrics['miscalibration_area']:.3f}")
        print(f"mean max_force_std   {metrics['mean_max_force_std']:.4f} eV/Å (calibrated)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate data if missing, train, and evaluate on the test sets of the config."""
    from mlforce.config import load_config
    from mlforce.generate import generate_datasets

    overrides = _parse_overrides(args.set)
    config = load_config(args.config, overrides)
    needed = [*config.data.train, *config.data.test.values()]
    if not all(Path(p).is_file() for p in needed):
        _log("generating reference data (GFN2-xTB Langevin MD) ...")
        generate_datasets(config, Path(config.data.train[0]).parent, log=_log)
    out = Path(args.out)
    metrics = run_training(args.config, None, str(out), overrides)
    print(f"checkpoint: {metrics['checkpoint']}")
    for name, path in config.data.test.items():
        m = run_evaluation(metrics["checkpoint"], path)
        print(
            f"test {name}: force MAE {m['force_mae']:.4f} eV/Å, energy MAE "
            f"{1000 * m['energy_mae_per_atom']:.2f} meV/atom ({m['n_configs']} frames)"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlforce", description="Active learning of ML force fields with MC-dropout."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_set(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE",
            help="override a config value, e.g. --set training.max_epochs=5",
        )  # fmt: skip

    p = sub.add_parser("generate", help="reference data by xTB (or other reference) Langevin MD")
    p.add_argument("config")
    p.add_argument("--out", default="datasets", help="output folder (default: datasets)")
    add_set(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train a model and write DIR/model.pt")
    p.add_argument("config")
    p.add_argument("--data", nargs="+", help="extxyz files (default: data.train of the config)")
    p.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument(
        "--ensemble", type=int, metavar="K",
        help="train a committee of K models (seeds differ); same as --set training.ensemble=K",
    )  # fmt: skip
    add_set(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="errors of a checkpoint on a labelled file")
    p.add_argument("checkpoint", help="model.pt or the directory that holds it")
    p.add_argument("data", help="extxyz file with reference energy and forces")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--mc-samples", type=int, metavar="T",
        help="MC-dropout samples: adds uncertainty-quality metrics (committees: always)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of the MC dropout masks (default 0)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="generate data if missing, train and evaluate")
    p.add_argument("config", nargs="?", default="configs/ethanol_xtb.yaml")
    p.add_argument("--out", default="runs/demo")
    add_set(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MlforceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
