"""Thread count and OpenMP wait policy: training and MD speed on ethanol, in one run.

Each setting runs in its own process (the wait policy is read when OpenMP starts): a few
training epochs of the shipped model on labelled ethanol frames (ms per training frame, the
flow's ``train_member``) and, with ``--checkpoint``, ethanol MD steps per second with the
deterministic model and with T = 16 MC dropout every step (``benchmarks/md_speed.py``'s loop).
Prints one JSON object with ratios against one thread under the flow's policy (PASSIVE).

    python benchmarks/threads.py --checkpoint runs/demo/round_007/model.pt
    python benchmarks/threads.py --config configs/water_xtb.yaml --frames W.extxyz --n-frames 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("PASSIVE", 1), ("PASSIVE", 2), ("ACTIVE", 1), ("ACTIVE", 2)]


def child(args: argparse.Namespace) -> dict:
    import torch
    from ase.io import read

    from mlforce.config import load_config
    from mlforce.data import graphs_from_frames, species_of
    from mlforce.device import set_threads
    from mlforce.train import build_model, train_member

    set_threads(args.threads)
    cfg = load_config(args.config)
    training = cfg.training.model_copy(update={"max_epochs": args.epochs, "patience": 10**6})
    cfg = cfg.model_copy(update={"training": training})
    frames = read(args.frames, f":{args.n_frames + 30}")
    species = species_of(frames)
    graphs = graphs_from_frames(frames, species, cfg.model.cutoff, torch.float32, True)
    model = build_model(species, cfg, frames)
    start = time.perf_counter()
    train_member(model, graphs[: args.n_frames], graphs[args.n_frames :], cfg, 0, lambda m: None)
    seconds = time.perf_counter() - start
    out = {"train_ms_per_frame": 1000 * seconds / (args.epochs * args.n_frames)}
    if args.checkpoint:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from md_speed import ml_rate

        from mlforce.calculators.ml import MLForceCalculator

        calc = MLForceCalculator(args.checkpoint, mc_samples=16, device="cpu")
        out["md_steps_per_s_deterministic"] = ml_rate(calc, args.md_steps, None)
        out["md_steps_per_s_mc_every_step"] = ml_rate(calc, args.md_steps, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a model for the MD part (skipped without)")
    parser.add_argument("--frames", default=str(ROOT / "datasets/ethanol_train.extxyz"))
    parser.add_argument("--config", default=str(ROOT / "configs/ethanol_xtb.yaml"),
                        help="the model and training settings (its batch size)")
    parser.add_argument("--n-frames", type=int, default=220, help="training frames")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--md-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.threads:
        print(json.dumps(child(args)))
        return
    results = {}
    for policy, threads in SETTINGS:
        cmd = [sys.executable, __file__, "--threads", str(threads), "--frames", args.frames,
               "--n-frames", str(args.n_frames), "--config", args.config,
               "--epochs", str(args.epochs), "--md-steps", str(args.md_steps)]  # fmt: skip
        if args.checkpoint:
            cmd += ["--checkpoint", args.checkpoint]
        env = dict(os.environ, OMP_WAIT_POLICY=policy)
        env.pop("OMP_NUM_THREADS", None)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=True)
        results[f"{policy.lower()}_{threads}"] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{policy} {threads}: {results[f'{policy.lower()}_{threads}']}", file=sys.stderr)
    base = results["passive_1"]
    ratios = {name: {k: round(v / base[k], 3) for k, v in r.items()} for name, r in results.items()}
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"), "settings": results,
        "ratio_to_passive_1": ratios,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
