"""Cost of a force + uncertainty call: deterministic vs batched MC dropout vs a Python loop.

Prints one JSON object. Times are medians over repeats of the full calculator path (graph
construction with the vesin neighbour list included). Ratios are against the deterministic
call measured in the same run.

    python benchmarks/uq_cost.py [--checkpoint runs/x] [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import numpy as np
import torch
from ase.build import molecule

from mlforce.calculators.ml import MLForceCalculator
from mlforce.checkpoint import Checkpoint, load_checkpoint
from mlforce.config import load_config
from mlforce.forces import compute_forces
from mlforce.model import ForceField
from mlforce.nn.dropout import DropoutKeys
from mlforce.uncertainty import MASK_CACHE


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", help="a trained model (default: fresh shipped config)")
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="molecules in the walker batch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        ckpt = load_checkpoint(args.checkpoint)
    else:
        torch.manual_seed(0)
        ckpt = Checkpoint([ForceField([1, 6, 8], load_config(args.config).model).eval()])
    device = torch.device(args.device)
    # the rows below time the MC spread alone; "default" the checkpoint as shipped (its T, its
    # local radius and, where it has one, σ combined with the latent distance)
    shipped, ckpt = ckpt, dataclasses.replace(ckpt, latent=None)

    def calc(**kw) -> MLForceCalculator:
        return MLForceCalculator(ckpt, device=str(device), **kw)

    ethanol = molecule("CH3CH2OH")
    walkers = []
    for k in range(args.batch):
        w = ethanol.copy()
        w.rattle(0.05, seed=k)
        walkers.append(w)
    results: dict[str, object] = {
        "machine": platform.processor() or platform.machine(),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "model": ckpt.model.config.model_dump(),
    }
    cache_limit = MASK_CACHE.max_elements
    for name, structures, repeats in (
        ("ethanol", [ethanol], args.repeats),
        (f"batch{args.batch}", walkers, max(3, args.repeats // 5)),
    ):
        det = calc(uncertainty=False)
        row = {"deterministic_ms": median_ms(lambda d=det, s=structures: d.predict(s), repeats)}
        for t in (8, 16, 32, 64):
            c = calc(mc_samples=t)
            row[f"mc{t}_batched_ms"] = median_ms(lambda c=c, s=structures: c.predict(s), repeats)

        for t in (16, 32):  # the same without reusing masks between calls (MaskCache off)
            c = calc(mc_samples=t)
            MASK_CACHE.max_elements = 0
            row[f"mc{t}_nocache_ms"] = median_ms(lambda c=c, s=structures: c.predict(s), repeats)
            MASK_CACHE.max_elements = cache_limit
        for t in (16, 32):  # σ of the worst 3 Å neighbourhood (uncertainty.local_radius)
            c = calc(mc_samples=t, local_radius=3.0)
            row[f"mc{t}_local3_ms"] = median_ms(lambda c=c, s=structures: c.predict(s), repeats)
        default = MLForceCalculator(shipped, device=str(device))
        row["default_ms"] = median_ms(lambda c=default, s=structures: c.predict(s), repeats)
        row["default_setting"] = {
            "mc_samples": default.mc_samples,
            "local_radius": default.local_radius,
            "latent_atoms": shipped.latent.n_points if shipped.latent is not None else None,
        }
        n_graphs = len(structures)
        keys16 = DropoutKeys.for_samples(0, 16, n_graphs, device).graph_keys

        def loop16(g=det, structs=structures, n=n_graphs, keys=keys16, model=ckpt.model):
            graph = g._graph(structs)
            compute_forces(model, graph, create_graph=False)
            for t in range(16):
                k = DropoutKeys(keys[t * n : (t + 1) * n])
                compute_forces(model, graph, create_graph=False, dropout=k)

        row["mc16_loop_ms"] = median_ms(loop16, max(3, repeats // 2))
        d = row["deterministic_ms"]
        row["mc16_batched_over_deterministic"] = row["mc16_batched_ms"] / d
        row["mc16_batched_over_loop"] = row["mc16_batched_ms"] / row["mc16_loop_ms"]
        row["mc8_batched_over_deterministic"] = row["mc8_batched_ms"] / d
        row["mc32_batched_over_deterministic"] = row["mc32_batched_ms"] / d
        row["mc64_batched_over_deterministic"] = row["mc64_batched_ms"] / d
        row["mc16_nocache_over_deterministic"] = row["mc16_nocache_ms"] / d
        row["mc32_nocache_over_deterministic"] = row["mc32_nocache_ms"] / d
        row["mc16_local3_over_deterministic"] = row["mc16_local3_ms"] / d
        row["mc32_local3_over_deterministic"] = row["mc32_local3_ms"] / d
        row["default_over_deterministic"] = row["default_ms"] / d
        results[name] = row
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
