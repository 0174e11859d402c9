"""Accuracy and speed against MACE: same 1000 xTB ethanol frames, same 900/100 split, same CPU.

Trains MACE (mace-torch, a small invariant configuration) with its own CLI, times it, then
trains mlforce with that same wall-time budget, and scores both on the 300 K and 800 K test
trajectories (force and energy MAE, and time per energy+forces call through each one's ASE
calculator). Prints one JSON object. Needs ``make bench-setup`` (installs mace-torch).

    make data bench-setup
    .venv/bin/python benchmarks/vs_mace.py --out runs/bench/vs_mace
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read, write

from mlforce.cli import run_training
from mlforce.data import random_split

MACE_ARGS = [
    "--model", "MACE", "--num_channels", "64", "--max_L", "0", "--r_max", "5.0",
    "--correlation", "3", "--num_interactions", "2", "--E0s", "average", "--batch_size", "10",
    "--ema", "--amsgrad", "--swa", "--start_swa", "60", "--max_num_epochs", "80",
    "--device", "cpu", "--default_dtype", "float32", "--seed", "0",
    "--energy_key", "REF_energy", "--forces_key", "REF_forces",
]  # fmt: skip


def mace_copy(frames, path: Path) -> None:
    """MACE wants REF_-prefixed keys: rename the reference labels in a copy."""
    out = []
    for atoms in frames:
        a = atoms.copy()
        a.calc = None
        a.info = {"REF_energy": atoms.get_potential_energy()}
        a.arrays["REF_forces"] = atoms.get_forces()
        out.append(a)
    write(path, out, format="extxyz")


def score(calc, frames) -> dict:
    e_err, f_err, times = [], [], []
    for k, atoms in enumerate(frames):
        a = atoms.copy()
        a.calc = calc
        t0 = time.perf_counter()
        e = a.get_potential_energy()
        f = a.get_forces()
        if k >= 3:  # warm-up calls excluded
            times.append(time.perf_counter() - t0)
        e_err.append((e - atoms.get_potential_energy()) / len(atoms))
        f_err.append(f - atoms.get_forces())
    f_err = np.concatenate(f_err)
    return {
        "force_mae": float(np.abs(f_err).mean()),
        "energy_mae_per_atom": float(np.abs(e_err).mean()),
        "ms_per_call": 1000 * float(np.median(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench/vs_mace")
    parser.add_argument("--config", default="configs/ethanol_xtb.yaml")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    frames = read("datasets/ethanol_train.extxyz", ":")
    train_idx, val_idx = random_split(len(frames), 0.1, 0)  # the split mlforce train uses
    mace_copy([frames[i] for i in train_idx], out / "train.xyz")
    mace_copy([frames[i] for i in val_idx], out / "valid.xyz")
    mace_train = shutil.which("mace_run_train") or str(
        Path(sys.executable).parent / "mace_run_train"
    )
    t0 = time.perf_counter()
    subprocess.run(
        [mace_train, "--name", "mace_ethanol", "--train_file", str(out / "train.xyz"),
         "--valid_file", str(out / "valid.xyz"), *MACE_ARGS],
        cwd=out, check=True, stdout=open(out / "mace_train.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    mace_seconds = time.perf_counter() - t0
    mlf = run_training(
        args.config, None, str(out / "mlforce"),
        {"training.max_minutes": mace_seconds / 60, "training.max_epochs": 1000},
    )  # fmt: skip

    from mace.calculators import MACECalculator

    from mlforce.calculators.ml import MLForceCalculator

    mace_calc = MACECalculator(
        model_paths=str(out / "mace_ethanol_stagetwo.model"), device="cpu",
        default_dtype="float32",
    )  # fmt: skip
    mlf_calc = MLForceCalculator(out / "mlforce", device="cpu", uncertainty=False)
    mlf_mc = MLForceCalculator(out / "mlforce", device="cpu", mc_samples=16)
    result: dict = {
        "machine": platform.machine(), "date": time.strftime("%Y-%m-%d"),
        "mace_training_seconds": mace_seconds, "mlforce_training_seconds": mlf["seconds"],
        "mlforce_epochs": mlf["epochs"],
    }  # fmt: skip
    for name in ("300K", "800K"):
        test = read(f"datasets/ethanol_test_{name}.extxyz", ":")
        result[name] = {
            "mace": score(mace_calc, test),
            "mlforce": score(mlf_calc, test),
            "mlforce_with_mc16_uncertainty": score(mlf_mc, test),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
