"""The ``mlforce`` command line.

Every user-facing error is one line ``error: ...`` on stderr and exit status 2, no traceback.
Progress goes to stderr; ``--json`` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mlforce.errors import MlforceError
from mlforce.keys import TRIGGERS


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
    paths = generate_datasets(config, args.out, log=_log, train=not args.test_only)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ase.io import write

    from mlforce.structures import density, water_box

    try:
        box = water_box(args.molecules, args.density, args.seed, args.min_distance)
    except ValueError as err:
        raise MlforceError(str(err)) from err
    out = Path(args.out or f"datasets/water_{args.molecules}.xyz")
    out.parent.mkdir(parents=True, exist_ok=True)
    write(out, box, format="extxyz")
    print(
        f"{out}: {args.molecules} water molecules, {len(box)} atoms, cubic cell "
        f"{box.cell.lengths()[0]:.3f} Å, {density(box):.3f} g/cm³ (periodic)"
    )
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
        latent=result.latent,
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
    checkpoint: str,
    data: str,
    mc_samples: int | str | None = None,
    seed: int | None = None,
    local_radius: float | None = None,
) -> dict:
    """Metrics of a checkpoint on a labelled structure file.

    Always: the deterministic model's errors (a committee's mean). With ``mc_samples`` (or a
    committee checkpoint) also the uncertainty quality: ``spearman_max_force``,
    ``auroc_top10``, ``miscalibration_area`` (calibrated) and ``mean_max_force_std``.
    ``mc_samples="auto"`` samples the T the checkpoint's calibration was fitted with.
    ``local_radius`` (Å; None: the checkpoint's; 0: off): σ of the worst neighbourhood.
    """
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames, read_labelled
    from mlforce.evaluate import evaluate_graphs, uncertainty_metrics
    from mlforce.uncertainty import predict_dataset

    ckpt = load_checkpoint(checkpoint)
    if mc_samples == "auto":
        mc_samples = ckpt.mc_samples
    elif isinstance(mc_samples, str):
        try:
            mc_samples = int(mc_samples)
        except ValueError:
            raise MlforceError(f"--mc-samples: a number or 'auto', got {mc_samples!r}") from None
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
    if mc_samples is None:
        mc_samples = ckpt.mc_samples
    radius = ckpt.local_radius if local_radius is None else local_radius
    if radius and radius > ckpt.cutoff:
        raise MlforceError(f"--local-radius {radius} Å exceeds the model cutoff {ckpt.cutoff} Å")
    pred = predict_dataset(
        ckpt.models, graphs, mc_samples, seed, local_radius=radius or None, latent=ckpt.latent
    )
    metrics = uncertainty_metrics(pred, graphs, ckpt.calibration)
    metrics["local_radius"] = radius or None
    metrics["uncertainty"] = "committee" if ckpt.is_ensemble else f"mc_dropout T={mc_samples}"
    # σ combined with the latent distance to this many training atoms (None: σ_MC alone)
    latent = ckpt.latent is not None and not ckpt.is_ensemble
    metrics["latent_atoms"] = ckpt.latent.n_points if latent else None
    return metrics


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = run_evaluation(
        args.checkpoint, args.data, args.mc_samples, args.seed, args.local_radius
    )
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"configurations       {metrics['n_configs']}")
    print(f"energy MAE           {1000 * metrics['energy_mae_per_atom']:.3f} meV/atom")
    print(f"force MAE            {metrics['force_mae']:.4f} eV/Å")
    print(f"force RMSE           {metrics['force_rmse']:.4f} eV/Å")
    if "spearman_max_force" in metrics:
        latent = metrics.get("latent_atoms")
        combined = f" x latent distance ({latent} training atoms)" if latent else ""
        print(f"uncertainty          {metrics['uncertainty']}{combined} ({metrics['calibration']})")
        print(f"Spearman max force   {metrics['spearman_max_force']:.3f}")
        print(f"AUROC top 10%        {metrics['auroc_top10']:.3f}")
        print(f"miscalibration area  {metrics['miscalibration_area']:.3f}")
        print(f"mean max_force_std   {metrics['mean_max_force_std']:.4f} eV/Å (calibrated)")
    return 0


def cmd_md(args: argparse.Namespace) -> int:
    """Uncertainty-driven MD of one walker; labels go to --store with the reference."""
    from mlforce.calculators.ml import MLForceCalculator
    from mlforce.checkpoint import checkpoint_hash
    from mlforce.config import Config, config_from_dict, read_config_dict
    from mlforce.md import load_start_structure, run_walker
    from mlforce.store import LabelStore

    data = read_config_dict(args.config) if args.config else {}
    overrides = _parse_overrides(args.set)
    flags = {
        "md.temperatures": [args.temperature] if args.temperature is not None else None,
        "md.steps": args.steps,
        "md.seed": args.seed,
        "md.thermostat": args.thermostat,
        "md.timestep_fs": args.timestep,
        "md.triggers.lower": args.lower,
        "md.triggers.upper": args.upper,
        "md.triggers.mode": args.mode,
        "md.triggers.check_every": args.check_every,
        "reference.kind": args.reference,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    from mlforce.config import apply_overrides

    config: Config = config_from_dict(
        apply_overrides(data, overrides), source=args.config or "command line"
    )
    md = config.md
    if args.store:
        parent = Path(args.store).resolve().parent
        if not parent.is_dir():
            raise MlforceError(f"--store {args.store}: directory {parent} does not exist")
    calc = MLForceCalculator(
        args.checkpoint,
        device=config.device,
        mc_samples=config.uncertainty.mc_samples,
        seed=config.uncertainty.seed,
        prediction=config.uncertainty.prediction,
    )
    atoms = load_start_structure(args.structure)
    store = LabelStore(args.store) if args.store else None
    summary = run_walker(
        calc,
        atoms,
        md.temperatures[0],
        md,
        seed=md.seed,
        store=store,
        reference=config.reference if store is not None else None,
        model_hash="m-" + checkpoint_hash(args.checkpoint),
        trajectory=args.trajectory,
        progress=sys.stderr.isatty() and not args.json,
        log=_log,
    )
    if args.json:
        out = summary.to_dict()
        out["labels_by_trigger"] = out.pop("labels")
        out["labels"] = summary.n_labels
        print(json.dumps(out))
    else:
        print(
            f"{summary.steps} steps ({summary.simulated_fs / 1000:.2f} ps), "
            f"labels {summary.labels or 0}, failed {summary.failed_labels}, "
            f"candidates {summary.candidates}, triggers/ps {summary.triggers_per_ps:.2f}, "
            f"rollbacks {summary.rollbacks}, stop: {summary.stop_reason}; "
            f"model {summary.model_seconds:.1f} s, reference {summary.reference_seconds:.1f} s"
        )
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    """The ledger as a table, JSON, CSV or extxyz export."""
    from mlforce.report import LABEL_COLUMNS, label_table, resolve_ledger

    ledger, _ = resolve_ledger(args.path)
    rows = label_table(
        ledger, args.round, args.trigger, args.status, args.min_std, args.sort, args.limit
    )
    if args.export:
        from ase.io import write

        from mlforce.store import LabelStore

        wanted = {r["id"] for r in rows}
        frames = [a for a in LabelStore(ledger).atoms() if a.info["id"] in wanted]
        write(args.export, frames, format="extxyz")
        _log(f"{len(frames)} labelled structures written to {args.export}")
    if args.json:
        print(json.dumps(rows))
    elif args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    elif not args.export:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{ledger}: {len(rows)} labels")
        for col in LABEL_COLUMNS:
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(*[_cell(r[c]) for c in LABEL_COLUMNS])
        Console().print(table)
    return 0


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_report(args: argparse.Namespace) -> int:
    from mlforce.report_html import build_report

    path = build_report(args.path, args.output)
    print(f"report: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The Prefect flow, in a child process (mlforce itself never imports Prefect)."""
    cmd = [sys.executable, "-m", "flows.active_learning", args.config]
    if args.run_dir:
        cmd += ["--run-dir", args.run_dir]
    if args.force:
        cmd.append("--force")
    for item in args.set or []:
        cmd += ["--set", item]
    return run_supervised(cmd)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when its parent dies, even by SIGKILL."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


SUPERVISOR_GRACE_S = 10.0  # s a signalled flow gets to end by itself


def run_supervised(cmd: list[str]) -> int:
    """Run ``cmd`` in its own process group and take the whole group down with it.

    SIGTERM and SIGINT are passed on to the group (which gets SIGKILL if it has not ended
    :data:`SUPERVISOR_GRACE_S` later); when the child ends, however it ends
    (kill -9 included), whatever it left behind in its group (Prefect's temporary server,
    Dask workers) is killed; when this process is killed, the child gets SIGTERM (Linux).
    """
    import signal
    import subprocess

    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec)

    asked: list[float] = []

    def forward(signum: int, _frame: Any) -> None:
        asked.append(time.monotonic())
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None:  # after a signal, SUPERVISOR_GRACE_S to end, then SIGKILL
            if asked and time.monotonic() - asked[0] > SUPERVISOR_GRACE_S:
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        code = proc.returncode
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return code if code >= 0 else 128 - code


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: test data, the active-learning flow, the report, the numbers."""

    from mlforce.campaign import RunDir
    from mlforce.config import load_config
    from mlforce.generate import generate_datasets
    from mlforce.report_html import build_report

    start = time.perf_counter()
    overrides = _parse_overrides(args.set)
    config = load_config(args.config, overrides)
    tests = config.active_learning.test_files
    if tests and not all(Path(p).is_file() for p in tests):
        _log("generating independent xTB test trajectories ...")
        generate_datasets(config, Path(tests[0]).parent, log=_log, train=False)
    cmd = [sys.executable, "-m", "flows.active_learning", args.config, "--run-dir", args.out]
    for item in args.set or []:
        cmd += ["--set", item]
    if args.force:
        cmd.append("--force")
    code = run_supervised(cmd)
    if code != 0:
        raise MlforceError(f"the active-learning flow failed (exit status {code})")
    state = RunDir(Path(args.out)).state()
    report = build_report(args.out)
    rounds = state["rounds"]
    print()
    print(f"run directory     {args.out}")
    print(f"final checkpoint  {state['final_checkpoint']}")
    print(f"report            {report}")
    print(f"stop reason       {state['stop_reason']}")
    print(f"reference labels  {state['labels_total']} in {len(rounds)} rounds")
    print(
        f"trigger rate      {rounds[0]['triggers_per_ps']:.2f}/ps (round 1) -> "
        f"{rounds[-1]['triggers_per_ps']:.2f}/ps (round {len(rounds)})"
    )
    for name, mae in (state.get("final_test_force_mae") or {}).items():
        print(f"test force MAE    {mae:.4f} eV/Å on {name}")
    print(f"wall time         {(time.perf_counter() - start) / 60:.1f} min")
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
    p.add_argument(
        "--test-only", action="store_true", help="only the test trajectories (no training set)"
    )
    add_set(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("build", help="build a starting structure (a periodic water box)")
    p.add_argument("kind", choices=["water"])
    p.add_argument("--molecules", type=int, default=32, help="water molecules (default 32)")
    p.add_argument("--density", type=float, default=1.0, help="g/cm³ (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="orientations and jitter")
    p.add_argument(
        "--min-distance", type=float, default=1.6,
        help="closest approach of atoms of different molecules, Å (default 1.6)",
    )  # fmt: skip
    p.add_argument("--out", help="extxyz file (default datasets/water_N.xyz)")
    p.set_defaults(func=cmd_build)

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
        "--mc-samples", nargs="?", const="auto", metavar="T",
        help="MC-dropout samples: adds uncertainty-quality metrics (committees: always); "
        "alone or 'auto': the T the checkpoint was calibrated with",
    )  # fmt: skip
    p.add_argument("--seed", type=int, help="seed of the MC dropout masks (default 0)")
    p.add_argument(
        "--local-radius", type=float, metavar="Å",
        help="rank by the σ of the worst neighbourhood of this radius (default: the "
        "checkpoint's uncertainty.local_radius; 0: of the worst atom)",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("md", help="uncertainty-driven MD with reference labels when unsure")
    p.add_argument("checkpoint", help="model.pt or the directory that holds it")
    p.add_argument("--structure", required=True, help="starting structure (any ASE format)")
    p.add_argument("--temperature", type=float, help="K (default: md.temperatures[0])")
    p.add_argument("--steps", type=int, help="MD steps (default: md.steps)")
    p.add_argument("--timestep", type=float, help="fs (default 0.5)")
    p.add_argument("--thermostat", choices=["langevin", "nve", "berendsen"])
    p.add_argument("--config", help="YAML config for md/reference/uncertainty settings")
    p.add_argument("--reference", choices=["xtb", "pyscf", "emt", "ase"], help="reference kind")
    p.add_argument("--store", help="label ledger (ASE db); without it nothing is labelled")
    p.add_argument("--lower", type=float, help="label threshold σ (eV/Å)")
    p.add_argument("--upper", type=float, help="rollback threshold σ (eV/Å)")
    p.add_argument("--mode", choices=["on_the_fly", "collect"])
    p.add_argument("--check-every", type=int, help="steps between uncertainty checks")
    p.add_argument("--seed", type=int)
    p.add_argument("--trajectory", help="extxyz trajectory with σ and decisions per frame")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_set(p)
    p.set_defaults(func=cmd_md)

    p = sub.add_parser("labels", help="the label ledger as a table / JSON / CSV / extxyz")
    p.add_argument("path", help="a run directory or a ledger (labels.db)")
    p.add_argument("--round", type=int, help="only this round (0: seed)")
    p.add_argument("--trigger", choices=list(TRIGGERS))
    p.add_argument("--status", choices=["ok", "failed"])
    p.add_argument("--min-std", type=float, help="only labels with max_force_std >= this")
    p.add_argument("--sort", help="column to sort by, '-' prefix for descending")
    p.add_argument("--limit", type=int)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON array of objects")
    fmt.add_argument("--csv", action="store_true")
    p.add_argument("--export", metavar="FILE.extxyz", help="write the selected structures")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("report", help="a self-contained HTML report of a campaign")
    p.add_argument("path", help="a run directory (or a ledger)")
    p.add_argument("-o", "--output", help="HTML file (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("run", help="run the active-learning flow (python -m flows.active_learning)")
    p.add_argument("config")
    p.add_argument("--run-dir")
    p.add_argument("--force", action="store_true")
    add_set(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the main job: the active-learning flow, report, numbers")
    p.add_argument("config", nargs="?", default="configs/ethanol_xtb.yaml")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--force", action="store_true", help="resume despite a config change")
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
