"""Where does a model's MD go? Reference energies of the frames a walker visits.

Runs one ML walker per checkpoint and seed (no σ triggers; the physical guards on), labels
every ``--every``-th step after ``--skip`` steps with the config's reference, and prints the
reference potential energy of those frames above the start structure's (eV, percentiles) next
to the same numbers for reference MD at the same temperature. A model whose surface is biased
samples hotter (or colder) configurations than the reference MD does.

    B=runs/bench/le2
    python benchmarks/walker_sampling.py --checkpoint mc=$B/mc_dropout_s0/round_002/model.pt \\
        --checkpoint committee=$B/ensemble_s0/round_002/model.pt --temperature 500 \\
        --steps 3000 --seeds 1 2

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase.io import read

from mlforce.calculators.ml import MLForceCalculator
from mlforce.calculators.reference import build_reference
from mlforce.config import load_config
from mlforce.data import read_structures
from mlforce.generate import reference_md
from mlforce.md import run_walker


def energies(frames, reference, zero: float) -> list[float]:
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = build_reference(reference, atoms)
        out.append(atoms.get_potential_energy() - zero)
    return out


def summary(values: list[float]) -> dict:
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"n": len(values), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--temperature", type=float, default=500.0, help="K")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=20, help="MD steps between labelled frames")
    parser.add_argument("--skip", type=int, default=200, help="MD steps left out at the start")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    start = read_structures(config.md.structures[0])[0]
    zero = energies([start], config.reference, 0.0)[0]
    md = config.md.model_copy(deep=True)
    md.steps, md.trajectory_every = args.steps, args.every
    md.triggers = md.triggers.model_copy(update={"lower": 1e8, "upper": 2e8})
    t0 = time.perf_counter()
    result: dict = {"temperature_K": args.temperature, "steps": args.steps, "runs": {}}
    for seed in args.seeds:
        gen = config.data.generate.model_copy(
            update={"interval": args.every, "equilibration_steps": args.skip}
        )
        frames = reference_md(start, config.reference, args.temperature,
                              (args.steps - args.skip) // args.every, gen, seed=seed)  # fmt: skip
        result["runs"].setdefault("reference_md", []).append(
            summary(energies(frames, config.reference, zero))
        )
        for item in args.checkpoint:
            name, path = item.split("=", 1)
            calc = MLForceCalculator(path, device="cpu")
            with tempfile.TemporaryDirectory() as tmp:
                traj = Path(tmp) / "walker.extxyz"
                s = run_walker(calc, start.copy(), args.temperature, md, seed=seed,
                               trajectory=traj)  # fmt: skip
                frames = [a for a in read(traj, ":") if int(a.info["md_step"]) >= args.skip]
            entry = summary(energies(frames, config.reference, zero))
            entry.update(stop_reason=s.stop_reason, guards=s.guards)
            result["runs"].setdefault(name, []).append(entry)
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
