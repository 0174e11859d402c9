"""Label efficiency: which way of choosing reference labels reaches a given accuracy soonest.

Runs the active-learning flow once per strategy and campaign seed, from the **same seed labels**
(one reference MD, written once and given to every campaign as ``active_learning.seed.file``)
and the same training schedule, each strategy differing from the shipped config only by the
overrides it names. Then, for each campaign seed, the "random from reference MD" baseline: the
same schedule trained on labels drawn at random from a reference-MD pool of the same simulated
time at the campaign's temperatures (the pool's own reference calls are counted too).

    python benchmarks/label_efficiency.py --out runs/bench/label_efficiency --parallel 2 \\
        --test 300K=datasets/ethanol_test_300K.extxyz \\
        --test 800K=datasets/ethanol_test_800K.extxyz > runs/bench/label_efficiency.json

Default strategies (``--strategy NAME=key=value,key=value`` replaces them):

* ``mc_dropout``: the shipped config (σ from MC dropout, ``selection: uncertainty``);
* ``random_candidates``: ``active_learning.selection=random``: as many labels per round, drawn
  uniformly from the frames the campaign's own ML-driven MD visited;
* ``ensemble``: ``training.ensemble=4`` without dropout: σ from a committee of 4.

Prints one JSON object: per strategy and test set, each seed's learning curve (labels the
model was trained on -> test force MAE, eV/Å), labels to reach ``--target`` (linear
interpolation between rounds, None if not reached), the area under the learning curve (mean
log10 MAE over the label range all runs share), the MAE at that shared label count, and the
reference calls of each campaign. Campaigns resume if their run directory exists; a test set
added after they ran (e.g. a second independent trajectory, with ``--collect``) is scored from
their round checkpoints. Progress goes
to stderr. ``--plot PNG`` draws the mean curves with their spread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STRATEGIES = {
    "mc_dropout": "",
    "random_candidates": "active_learning.selection=random",
    "ensemble": "training.ensemble=4,model.node_dropout=0,model.edge_dropout=0",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"{what}: expected NAME=VALUE, got {item!r}")
        out[name] = value
    return out


def make_seed_file(config_path: str, out: Path) -> Path:
    """The seed labels every campaign starts from (the config's own seed rule, run once)."""
    from ase.io import write

    from mlforce.campaign import seed_frames
    from mlforce.config import load_config

    path = out / "seed_labels.extxyz"
    if not path.is_file():
        frames = seed_frames(load_config(config_path))
        write(path, frames, format="extxyz")
        log(f"seed labels: {len(frames)} frames -> {path}")
    return path


def campaign_command(
    config: str, run_dir: Path, overrides: dict[str, str], threads: int | None
) -> list[str]:
    cmd = [sys.executable, "-m", "flows.active_learning", config, "--run-dir", str(run_dir)]
    if threads:
        overrides = {"training.threads": str(threads), **overrides}
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def run_campaign(job: dict) -> dict:
    """One campaign in its own process (resumes a finished or interrupted run directory)."""
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_WAIT_POLICY="PASSIVE")
    if job["threads"]:
        env["OMP_NUM_THREADS"] = str(job["threads"])
    log(f"start {job['name']}")
    t0 = time.perf_counter()
    with open(job["run_dir"].parent / f"{job['run_dir'].name}.log", "a") as fh:
        proc = subprocess.run(job["cmd"], cwd=ROOT, env=env, stdout=fh, stderr=fh)
    seconds = time.perf_counter() - t0
    log(f"done  {job['name']} (exit {proc.returncode}, {seconds:.0f} s)")
    return {"name": job["name"], "returncode": proc.returncode, "seconds": seconds}


def campaign_curve(run_dir: Path, tests: dict[str, str]) -> dict:
    """Learning curve over a campaign's finished rounds: round k's model saw rounds < k.

    A test file the campaign was not given (``active_learning.test_files``) is scored here from
    the round checkpoints, once (cached in ``RUN_DIR/extra_scores.json``)."""
    from mlforce.store import LabelStore

    state = json.loads((run_dir / "state.json").read_text())
    checkpoints = [run_dir / f"round_{r['round']:03d}" / "model.pt" for r in state["rounds"]]
    points = [(r["labels_total"] - r["labels_added"], r.get("test_force_mae") or {})
              for r in state["rounds"]]  # fmt: skip
    if "labels_total" in state:  # finished: the final model on every label
        points.append((state["labels_total"], state.get("final_test_force_mae") or {}))
        checkpoints.append(run_dir / Path(state["final_checkpoint"]).parent.name / "model.pt")
    given = {str(Path(f).resolve()) for f in campaign_test_files(run_dir)}
    curve = {}
    for name, file in tests.items():
        if str(Path(file).resolve()) in given:
            stem = Path(file).stem
            curve[name] = [(n, s[stem]) for n, s in points if stem in s]
        else:
            cache = run_dir / "extra_scores.json"
            curve[name] = [(n, extra_score(c, file, cache))
                           for (n, _), c in zip(points, checkpoints, strict=True)]  # fmt: skip
    rows = LabelStore(run_dir / "labels.db").rows()
    seed_rows = sum(r.get("trigger") == "seed" for r in rows)
    return {
        "curve": curve,
        "reference_calls": len(rows) - seed_rows,  # labels the campaign paid for (ok + failed)
        "seed_labels": seed_rows,
        "labels_by_trigger": _count(r.get("trigger") for r in rows),
        "stop_reason": state.get("stop_reason"),
        "rounds": len(state["rounds"]),
        "triggers_per_ps": [r["triggers_per_ps"] for r in state["rounds"]],
        "simulated_fs": 1000 * sum(r["simulated_ps"] for r in state["rounds"]),
    }


def campaign_test_files(run_dir: Path) -> list[str]:
    """The test files a campaign scored its round models on (its config's)."""
    from mlforce.config import load_config

    return list(load_config(run_dir / "config.yaml").active_learning.test_files or [])


def extra_score(checkpoint: Path, file: str, cache: Path) -> float:
    """Deterministic force MAE (eV/Å) of ``checkpoint`` on ``file``, cached by both paths."""
    from mlforce.campaign import test_errors

    done = json.loads(cache.read_text()) if cache.is_file() else {}
    key = f"{checkpoint.resolve()} :: {Path(file).resolve()}"
    if key not in done:
        done[key] = test_errors(str(checkpoint), [file])[Path(file).stem]
        log(f"scored {checkpoint} on {file}: {done[key]:.4f} eV/Å")
        cache.write_text(json.dumps(done, indent=1))
    return done[key]


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[str(item)] = out.get(str(item), 0) + 1
    return out


def pool_curve(run_dir: Path, seed_file: Path, tests: dict[str, str], work: Path, seed: int):
    """Random labels from a reference-MD pool, trained on the campaign's schedule and counts."""
    from ase.io import read, write

    from mlforce.campaign import RunDir, round_config, test_errors
    from mlforce.checkpoint import save_checkpoint
    from mlforce.generate import reference_md
    from mlforce.md import load_start_structure
    from mlforce.store import split_frames
    from mlforce.train import train_models

    run = RunDir(run_dir)
    config = run.config()
    state = run.state()
    work.mkdir(parents=True, exist_ok=True)
    cached = work / "curve.json"
    if cached.is_file():  # a finished pool curve of this campaign (delete it to redo)
        done = json.loads(cached.read_text())
        if done.get("campaign_labels") == state["labels_total"]:
            result = done["result"]
            counts = [n for n, _ in next(iter(result["curve"].values()))]
            for name, file in tests.items():  # a test set added since: score the checkpoints
                if name not in result["curve"]:
                    result["curve"][name] = [
                        (n, extra_score(work / f"round_{k:03d}" / "model.pt", file,
                                        work / "extra_scores.json"))
                        for k, n in enumerate(counts, start=1)
                    ]  # fmt: skip
            return result
    gen = config.data.generate.model_copy(update={"interval": 20, "equilibration_steps": 200})
    total_fs = 1000 * sum(r["simulated_ps"] for r in state["rounds"])
    temps = config.md.temperatures
    per_walker = max(1, int(total_fs / (gen.interval * gen.timestep_fs)) // len(temps))
    pool_file = work / "reference_pool.extxyz"
    if pool_file.is_file():
        pool = read(pool_file, ":")
    else:
        pool = []
        for s, path in enumerate(config.md.structures):
            start = load_start_structure(path)
            for t, temperature in enumerate(temps):
                pool += reference_md(start, config.reference, temperature, per_walker, gen,
                                     seed=777 + 100 * seed + 10 * s + t)  # fmt: skip
        write(pool_file, pool, format="extxyz")
    md_steps = (
        len(config.md.structures)
        * len(temps)
        * (gen.equilibration_steps + per_walker * gen.interval)
    )
    seeds = read(seed_file, ":")
    order = np.random.default_rng(seed).permutation(len(pool))
    counts = [r["labels_total"] - r["labels_added"] for r in state["rounds"]]
    counts.append(state["labels_total"])
    curve: dict[str, list] = {name: [] for name in tests}
    previous = None
    val_frac = config.active_learning.val_fraction
    for k, n_labels in enumerate(counts, start=1):
        chosen = seeds + [pool[i] for i in order[: max(0, n_labels - len(seeds))]]
        train, val = split_frames(chosen, val_frac)
        val = val or train[-1:]
        cfg = round_config(config, previous is not None, k == len(counts))  # the last: final
        result = train_models(train, val, cfg, warm_start=previous, log=lambda m: None)
        previous = result.models
        path = save_checkpoint(work / f"round_{k:03d}", result.models)
        scores = test_errors(str(path), list(tests.values()))
        for name, file in tests.items():
            curve[name].append((len(chosen), scores[Path(file).stem]))
        log(f"pool seed {seed}: {len(chosen)} labels -> {scores}")
    result = {
        "curve": curve,
        "reference_calls": counts[-1] - len(seeds),
        "pool_frames": len(pool),
        "pool_reference_calls": md_steps,
        "seed_labels": len(seeds),
    }
    cached.write_text(json.dumps({"campaign_labels": state["labels_total"], "result": result}))
    return result


def labels_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Labels at which the curve first reaches ``target`` (linear between points)."""
    for (n0, m0), (n1, m1) in itertools.pairwise(curve):
        if m0 <= target:
            return float(n0)
        if m1 <= target:
            return float(n0 + (n1 - n0) * (m0 - target) / (m0 - m1))
    return float(curve[-1][0]) if curve and curve[-1][1] <= target else None


def interpolate(curve: list[tuple[int, float]], n: float) -> float:
    xs, ys = zip(*curve)
    return float(10 ** np.interp(n, xs, np.log10(ys)))


def summarise(runs: list[dict], test: str, target: float, lo: float, hi: float) -> dict:
    curves = [r["curve"][test] for r in runs]
    grid = np.linspace(lo, hi, 50)
    reach = [labels_to_reach(c, target) for c in curves]
    aulc = [float(np.mean([np.log10(interpolate(c, n)) for n in grid])) for c in curves]
    at_hi = [interpolate(c, hi) for c in curves]
    reached = [x for x in reach if x is not None]
    return {
        "labels_to_target": reach,
        "labels_to_target_mean": float(np.mean(reached)) if len(reached) == len(reach) else None,
        "aulc_mean_log10_mae": aulc,
        "aulc_mean": float(np.mean(aulc)),
        "mae_at_shared_labels": at_hi,
        "mae_at_shared_labels_mean": float(np.mean(at_hi)),
        "curves": curves,
    }


def plot(result: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tests = result["tests"]
    fig, axes = plt.subplots(1, len(tests), figsize=(4.6 * len(tests), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    styles = ["o-", "s--", "^-.", "d:", "v-", "P--", "X-.", "*:", "h-"]  # up to 9 strategies
    for ax, test in zip(axes, tests, strict=True):
        for (name, data), style in zip(result["strategies"].items(), styles, strict=False):
            curves = data["summary"][test]["curves"]
            lo = max(c[0][0] for c in curves)
            hi = min(c[-1][0] for c in curves)
            grid = np.linspace(lo, hi, 40)
            ys = np.array([[interpolate(c, n) for n in grid] for c in curves])
            line = ax.plot(grid, np.exp(np.log(ys).mean(0)), style, ms=3, markevery=8,
                           label=f"{name} ({len(curves)} seeds)")  # fmt: skip
            ax.fill_between(grid, ys.min(0), ys.max(0), color=line[0].get_color(), alpha=0.15)
        ax.axhline(result["target_force_mae"], color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("reference labels in training")
        ax.set_title(f"test {test}")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("force MAE (eV/Å)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def markdown(result: dict) -> str:
    """A table of the summary, one row per strategy (means over seeds; per seed in brackets)."""
    tests = result["tests"]
    head = ["strategy", "seeds"]
    for test in tests:
        head += [f"labels to {result['target_force_mae']} ({test})", f"AULC {test}",
                 f"MAE {test} at {result['shared_label_range'][test][1]:.0f} labels"]  # fmt: skip
    head += ["reference calls", "converged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x: float | None) -> str:
        return "not reached" if x is None else f"{x:.0f}"

    for name, data in result["strategies"].items():
        runs = [r for r in data["runs"] if "curve" in r]
        row = [name, str(len(runs))]
        for test in tests:
            s = data["summary"][test]
            per = ", ".join(fmt(x) for x in s["labels_to_target"])
            row += [f"{fmt(s['labels_to_target_mean'])} [{per}]",
                    f"{s['aulc_mean']:.3f}",
                    f"{s['mae_at_shared_labels_mean']:.4f} "
                    f"[{', '.join(f'{x:.4f}' for x in s['mae_at_shared_labels'])}]"]  # fmt: skip
        calls = f"{data['reference_calls_mean']:.0f}"
        if "pool_reference_calls_mean" in data:
            calls += f" + {data['pool_reference_calls_mean']:.0f} (pool MD)"
        stops = [r.get("stop_reason") or "" for r in runs]
        converged = (
            f"{sum(x.startswith('converged') for x in stops)} of {len(runs)}"
            if any(stops)
            else "n/a"
        )
        lines.append("| " + " | ".join([*row, calls, converged]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--out", default="runs/bench/label_efficiency")
    parser.add_argument("--test", action="append", default=[], metavar="NAME=FILE")
    parser.add_argument("--strategy", action="append", metavar="NAME=KEY=VALUE,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--target", type=float, default=0.05, help="force MAE (eV/Å)")
    parser.add_argument("--parallel", type=int, default=1, help="campaigns at a time")
    parser.add_argument("--no-pool", action="store_true", help="skip random-from-reference-MD")
    parser.add_argument(
        "--skip-missing", action="store_true", help="summarise only the campaigns that exist"
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="run nothing: summarise the run directories as they are (unfinished campaigns "
        "count with their finished rounds) and the pool curves already computed",
    )
    parser.add_argument("--plot", help="PNG of the learning curves")
    parser.add_argument("--markdown", action="store_true", help="a summary table on stderr")
    parser.add_argument("--from-json", help="re-plot / re-tabulate an earlier run's JSON")
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="merge earlier outputs, re-summarise, print"
    )
    args = parser.parse_args()
    if args.merge:
        finish(merge(args.merge, args.target), args)
        return
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        if args.plot:
            plot(result, args.plot)
        print(markdown(result))
        return
    tests = parse_pairs(args.test, "--test")
    if not tests:
        raise SystemExit("--test NAME=FILE: at least one test set")
    for name, file in tests.items():
        if not Path(file).is_file():
            raise SystemExit(f"--test {name}: {file} not found (make data generates it)")
    strategies = DEFAULT_STRATEGIES
    if args.strategy:
        strategies = {k: v for k, v in (s.partition("=")[::2] for s in args.strategy)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seed_file = make_seed_file(args.config, out)
    threads = 1 if args.parallel > 1 else None
    jobs = []
    for seed in args.seeds:  # seed-major: every strategy gets its first seed early
        for name, text in strategies.items():
            overrides = {
                "active_learning.seed.source": "file",
                "active_learning.seed.file": str(seed_file.resolve()),
                "active_learning.test_files": json.dumps([str(Path(f).resolve())
                                                          for f in tests.values()]),
                "training.seed": str(seed), "md.seed": str(seed), "uncertainty.seed": str(seed),
            }  # fmt: skip
            # commas inside [...] belong to a list value: md.bias.temperatures=[300,500]
            items = re.split(r",(?![^\[]*\])", text)
            overrides.update(parse_pairs([p for p in items if p], name))
            run_dir = out / f"{name}_s{seed}"
            if (args.skip_missing or args.collect) and not (run_dir / "state.json").is_file():
                log(f"skip {name} seed {seed}: no run directory")
                continue
            jobs.append({"name": f"{name} seed {seed}", "run_dir": run_dir, "threads": threads,
                         "cmd": campaign_command(args.config, run_dir, overrides, None),
                         "strategy": name, "seed": seed})  # fmt: skip
    if args.collect:
        outcomes = [{"returncode": 0, "seconds": None} for _ in jobs]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            outcomes = list(pool.map(run_campaign, jobs))
    result: dict = {"config": args.config, "tests": list(tests), "seeds": args.seeds,
                    "target_force_mae": args.target, "strategies": {}}  # fmt: skip
    for job, outcome in zip(jobs, outcomes, strict=True):
        entry = result["strategies"].setdefault(job["strategy"], {"runs": []})
        if outcome["returncode"] != 0:
            entry["runs"].append({"seed": job["seed"], "failed": outcome})
            continue
        run = {"seed": job["seed"], "seconds": outcome["seconds"],
               **campaign_curve(job["run_dir"], tests)}  # fmt: skip
        if args.collect and not all(run["curve"].get(t) for t in tests):
            log(f"skip {job['name']}: no finished round yet")
            continue
        entry["runs"].append(run)
    if not args.no_pool:
        base = next(iter(strategies))
        entry = {"runs": []}
        for seed in args.seeds:
            run_dir = out / f"{base}_s{seed}"
            if args.collect and not (out / f"pool_s{seed}" / "curve.json").is_file():
                log(f"pool seed {seed}: no finished pool curve, left out")
                continue
            if (run_dir / "state.json").is_file():
                t0 = time.perf_counter()
                entry["runs"].append({"seed": seed, **pool_curve(
                    run_dir, seed_file, tests, out / f"pool_s{seed}", seed
                ), "seconds": time.perf_counter() - t0})  # fmt: skip
        if entry["runs"]:
            result["strategies"]["random_reference_md"] = entry
    summarise_all(result, list(tests), args.target)
    result["seconds"] = time.perf_counter() - start
    finish(result, args)


def summarise_all(result: dict, tests: list[str], target: float) -> None:
    """Per strategy and test: labels to target, AULC and MAE over the label range all share."""
    done = [r for data in result["strategies"].values() for r in data["runs"] if "curve" in r]
    for test in tests:
        lo = max(r["curve"][test][0][0] for r in done)
        hi = min(r["curve"][test][-1][0] for r in done)
        result.setdefault("shared_label_range", {})[test] = [lo, hi]
        for data in result["strategies"].values():
            runs = [r for r in data["runs"] if "curve" in r]
            if runs:
                data.setdefault("summary", {})[test] = summarise(runs, test, target, lo, hi)
    for data in result["strategies"].values():
        runs = [r for r in data["runs"] if "curve" in r]
        data["reference_calls_mean"] = float(np.mean([r["reference_calls"] for r in runs]))
        if runs and "pool_reference_calls" in runs[0]:
            data["pool_reference_calls_mean"] = float(
                np.mean([r["pool_reference_calls"] for r in runs])
            )


def finish(result: dict, args: argparse.Namespace) -> None:
    result["date"] = time.strftime("%Y-%m-%d")
    if args.plot:
        plot(result, args.plot)
    if args.markdown:
        print(markdown(result), file=sys.stderr)
    print(json.dumps(result, indent=1))


def merge(files: list[str], target: float) -> dict:
    """The runs of several earlier outputs (e.g. one per seed) in one result, re-summarised."""
    result: dict = {}
    for file in files:
        data = json.loads(Path(file).read_text())
        if not result:
            result = {**data, "strategies": {}, "merged_from": files}
        for name, entry in data["strategies"].items():
            runs = result["strategies"].setdefault(name, {"runs": []})["runs"]
            runs += [r for r in entry["runs"] if r["seed"] not in {x["seed"] for x in runs}]
    result["seeds"] = sorted({r["seed"] for e in result["strategies"].values() for r in e["runs"]})
    summarise_all(result, list(result["tests"]), result.get("target_force_mae", target))
    return result


if __name__ == "__main__":
    main()
