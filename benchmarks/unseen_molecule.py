"""A molecule the model has never seen: does σ flag it before the walker can go astray?

Runs the campaign's walker (collect mode, the config's triggers and guards) with a checkpoint
trained on one molecule, started on other molecules, and reports the MD step of the first
flagged frame, σ there against σ on the training molecule's test frames, and any guard or
rollback before it (docs/benchmarks.md 17).

    python benchmarks/unseen_molecule.py runs/demo_e150/round_007/model.pt \\
        --config configs/ethanol_xtb.yaml --known datasets/ethanol_test_800K.extxyz \\
        --molecules data/malonaldehyde.xyz data/aspirin.xyz
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from ase.io import read

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import load_config
from mlforce.data import read_structures
from mlforce.md import run_walker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    parser.add_argument("--known", required=True, help="test frames of the trained molecule")
    parser.add_argument("--molecules", nargs="+", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=300.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    md = config.md.model_copy(deep=True)
    md.triggers.mode = "collect"
    calc = MLForceCalculator(
        args.checkpoint, device="cpu", mc_samples=config.uncertainty.mc_samples
    )
    known = []
    for frame in read(args.known, ":"):
        frame.calc = calc
        frame.get_forces()
        known.append(calc.results["max_force_std"])
    out = {
        "checkpoint": args.checkpoint,
        "threshold": md.triggers.lower,
        "check_every": md.triggers.check_every,
        "known_sigma_max": float(np.max(known)),
        "known_sigma_p99": float(np.percentile(known, 99)),
        "molecules": {},
    }
    for path in args.molecules:
        atoms = read_structures(path)[0]
        candidates = []
        with tempfile.TemporaryDirectory() as tmp:
            trajectory = Path(tmp) / "walker.extxyz"
            summary = run_walker(calc, atoms, args.temperature, md, steps=args.steps, seed=0,
                                 candidates=candidates, trajectory=trajectory)  # fmt: skip
            guard_steps = [
                int(f.info["md_step"]) for f in read(trajectory, ":")
                if str(f.info.get("decision", "")).startswith("guard")
            ]  # fmt: skip
        first = candidates[0] if candidates else None
        out["molecules"][path] = {
            "formula": atoms.get_chemical_formula(),
            "first_flag_step": int(first.info["md_step"]) if first else None,
            "sigma_at_first_flag": float(first.info["max_force_std"]) if first else None,
            "flagged_checks": summary.candidates,
            "checks": summary.checks,
            "guards": summary.guards,
            "guard_steps": guard_steps,
            "rollbacks": summary.rollbacks,
            "stop_reason": summary.stop_reason,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
