"""The mlforce CLI end to end on real xTB data, and its one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from mlforce.checkpoint import load_checkpoint
from mlforce.cli import main
from mlforce.config import load_config
from tests.conftest import ROOT

SMALL = [
    "--set", "model.features=16", "--set", "model.blocks=1", "--set", "model.radial_basis=8",
    "--set", "training.max_epochs=2", "--set", "training.max_minutes=null",
    "--set", "training.batch_size=4", "--set", "device=cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """generate -> train on a few xTB frames through the CLI (in process)."""
    out = tmp_path_factory.mktemp("cli")
    gen = [
        "--set", "data.generate.frames=16", "--set", "data.generate.test_frames=6",
        "--set", "data.generate.interval=4", "--set", "data.generate.equilibration_steps=10",
        "--set", "data.generate.temperatures=[300, 700]",
        "--set", "data.generate.test_temperatures=[300]",
    ]  # fmt: skip
    config = str(ROOT / "configs" / "ethanol_xtb.yaml")
    assert main(["generate", config, "--out", str(out / "data"), *gen]) == 0
    train_file = out / "data" / "ethanol_train.extxyz"
    assert main(["train", config, "--data", str(train_file), "--out", str(out / "m"), *SMALL]) == 0
    return out, config


def test_generate_writes_labelled_extxyz(small_run):
    out, _ = small_run
    frames = read(out / "data" / "ethanol_train.extxyz", ":")
    assert len(frames) == 16
    assert np.isfinite(frames[0].get_potential_energy())
    assert frames[0].get_forces().shape == (9, 3)
    assert len(read(out / "data" / "ethanol_test_300K.extxyz", ":")) == 6


def test_generate_test_only_for_another_molecule(tmp_path):
    """The test trajectory of a molecule alone (the multi-molecule config's test sets)."""
    config = str(ROOT / "configs" / "molecules_xtb.yaml")
    args = ["--set", "data.generate.structure=data/malonaldehyde.xyz",
            "--set", "data.generate.test_frames=3", "--set", "data.generate.interval=2",
            "--set", "data.generate.equilibration_steps=4"]  # fmt: skip
    assert main(["generate", config, "--test-only", "--out", str(tmp_path), *args]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["malonaldehyde_test_300K.extxyz"]
    frames = read(tmp_path / "malonaldehyde_test_300K.extxyz", ":")
    assert len(frames) == 3 and frames[0].get_chemical_formula() == "C3H4O2"
    assert np.isfinite(frames[-1].get_forces()).all()


def test_train_and_evaluate_json(small_run, capsys):
    out, _ = small_run
    assert (out / "m" / "model.pt").is_file()
    # the checkpoint records the T its σ scale was fitted with (the config's mc_samples)
    calibration = load_checkpoint(out / "m").calibration
    config = load_config(ROOT / "configs" / "ethanol_xtb.yaml")
    assert calibration["mc_samples"] == config.uncertainty.mc_samples
    capsys.readouterr()
    test_file = out / "data" / "ethanol_test_300K.extxyz"
    assert main(["evaluate", str(out / "m"), str(test_file), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"n_configs", "energy_mae_per_atom", "force_mae", "force_rmse"} <= set(metrics)
    assert metrics["n_configs"] == 6
    assert 0 < metrics["force_mae"] <= metrics["force_rmse"]


@pytest.mark.parametrize("flag", [["--mc-samples"], ["--mc-samples", "auto"]])
def test_evaluate_mc_samples_auto_uses_the_checkpoint_t(small_run, capsys, flag):
    out, _ = small_run
    t_default = load_checkpoint(out / "m").mc_samples
    test_file = out / "data" / "ethanol_test_300K.extxyz"
    capsys.readouterr()
    assert main(["evaluate", str(out / "m"), str(test_file), *flag, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["uncertainty"] == f"mc_dropout T={t_default}"
    assert {"force_mae", "spearman_max_force", "auroc_top10", "miscalibration_area"} <= set(metrics)
    assert main(["evaluate", str(out / "m"), str(test_file), "--mc-samples", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["uncertainty"] == "mc_dropout T=4"
    assert main(["evaluate", str(out / "m"), str(test_file), "--mc-samples", "x"]) == 2
    assert "a number or 'auto'" in capsys.readouterr().err


def _labelled(atoms, path):
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    write(path, atoms, format="extxyz")


def test_unknown_element_is_a_clear_error(small_run, tmp_path, capsys):
    from ase.build import molecule

    out, _ = small_run
    _labelled(molecule("CH3Cl"), tmp_path / "cl.extxyz")
    assert main(["evaluate", str(out / "m"), str(tmp_path / "cl.extxyz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "element Cl" in err and "unknown to the model" in err
    assert "\n" not in err


def test_broken_file_and_nan_coordinates(small_run, tmp_path, capsys):
    out, _ = small_run
    broken = tmp_path / "broken.extxyz"
    broken.write_text("9\nProperties=species:S:1:pos:R:3 energy=1\nC 0 0\n")
    assert main(["evaluate", str(out / "m"), str(broken)]) == 2
    assert "cannot parse structure file" in capsys.readouterr().err
    unknown = tmp_path / "xx.xyz"
    unknown.write_text("2\nunknown element\nXx 0 0 0\nH 0 0 0.74\n")
    assert main(["evaluate", str(out / "m"), str(unknown)]) == 2
    err = capsys.readouterr().err
    assert str(unknown) in err and "unknown element symbol 'Xx'" in err
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.positions[4, 1] = np.nan
    _labelled(atoms, tmp_path / "nan.extxyz")
    assert main(["evaluate", str(out / "m"), str(tmp_path / "nan.extxyz")]) == 2
    assert "non-finite coordinates for atom 4" in capsys.readouterr().err


def test_config_with_unknown_key_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  epochs: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mlforce.cli", "train", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {bad}: training.epochs: unknown key"
