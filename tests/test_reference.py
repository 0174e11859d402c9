"""Reference calculators from config: real xTB, EMT and PySCF; failures; clear setting errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from tblite.ase import TBLite

from mlforce.calculators.reference import (
    build_reference,
    compute_reference,
    reference_description,
    validate_reference,
)
from mlforce.config import ReferenceConfig, config_from_dict
from mlforce.errors import ConfigError, ReferenceFailure
from tests.conftest import ROOT

sys.path.insert(0, str(Path(__file__).parent / "helpers"))  # mlforce_test_calcs
FLAKY = "mlforce_test_calcs:FlakyEMT"


def _direct(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()


def test_xtb_ethanol_matches_tblite_directly():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    result = compute_reference(atoms, ReferenceConfig())
    energy, forces = _direct(atoms, TBLite(method="GFN2-xTB", verbosity=0))
    assert result.energy == pytest.approx(energy, abs=1e-8)
    np.testing.assert_allclose(result.forces, forces, atol=1e-8)
    assert result.reference.startswith("xtb GFN2-xTB charge=0 multiplicity=1")

    gfn1 = compute_reference(atoms, ReferenceConfig(method="GFN1-xTB"))
    energy1, _ = _direct(atoms, TBLite(method="GFN1-xTB", verbosity=0))
    assert gfn1.energy == pytest.approx(energy1, abs=1e-8)
    assert abs(gfn1.energy - result.energy) > 1.0


def test_xtb_charge_and_multiplicity_from_atoms_info():
    hydroxide = molecule("OH")
    hydroxide.info["charge"] = -1
    result = compute_reference(hydroxide, ReferenceConfig())
    expected = _direct(hydroxide, TBLite(charge=-1, multiplicity=1, verbosity=0))[0]
    assert result.energy == pytest.approx(expected)
    assert "charge=-1 multiplicity=1" in result.reference

    oxygen = molecule("O2")
    oxygen.info["spin"] = 3  # read as the multiplicity 2S+1
    triplet = compute_reference(oxygen, ReferenceConfig())
    expected = _direct(oxygen, TBLite(multiplicity=3, verbosity=0))[0]
    assert triplet.energy == pytest.approx(expected)


def test_xtb_in_child_process_after_parent_ran_openmp_code():
    # The parent ran tblite above (OpenMP); a child must still work (no libgomp fork hang).
    atoms = molecule("CH3CH2OH")
    in_process = compute_reference(atoms, ReferenceConfig())
    in_child = compute_reference(atoms, ReferenceConfig(timeout_s=60))
    assert in_child.energy == pytest.approx(in_process.energy, abs=1e-8)
    np.testing.assert_allclose(in_child.forces, in_process.forces, atol=1e-8)


def test_emt_on_copper():
    atoms = bulk("Cu", "fcc", a=3.6).repeat(2)
    atoms.rattle(0.05, seed=2)
    result = compute_reference(atoms, ReferenceConfig(kind="emt"))
    energy, forces = _direct(atoms, EMT())
    assert result.energy == pytest.approx(energy)
    np.testing.assert_allclose(result.forces, forces, atol=1e-12)
    assert result.reference.startswith("emt")


def test_ase_calculator_by_import_path():
    atoms = bulk("Cu", "fcc", a=3.6).repeat(2)
    cfg = ReferenceConfig(kind="ase", calculator=FLAKY, kwargs={"mode": "none"})
    assert compute_reference(atoms, cfg).energy == pytest.approx(_direct(atoms, EMT())[0])
    dotted = ReferenceConfig(kind="ase", calculator="ase.calculators.emt.EMT")
    assert isinstance(build_reference(dotted), EMT)
    assert reference_description(cfg) == f'ase {FLAKY} {{"mode": "none"}}'


def test_pyscf_forces_match_finite_differences():
    atoms = molecule("H2O")
    atoms.rattle(0.02, seed=3)
    cfg = ReferenceConfig(kind="pyscf", basis="sto-3g")  # B3LYP
    result = compute_reference(atoms, cfg)
    assert result.reference.startswith("pyscf B3LYP/sto-3g charge=0 multiplicity=1")
    rng = np.random.default_rng(0)
    h = 1e-3  # Å
    for _ in range(2):  # central differences along random directions (9-dim unit vectors)
        direction = rng.normal(size=(len(atoms), 3))
        direction /= np.linalg.norm(direction)
        energies = []
        for sign in (1, -1):
            displaced = atoms.copy()
            displaced.positions += sign * h * direction
            energies.append(compute_reference(displaced, cfg).energy)
        slope = (energies[0] - energies[1]) / (2 * h)
        assert -slope == pytest.approx(np.sum(result.forces * direction), abs=1e-4)


def test_scf_iteration_limit_is_a_reference_failure():
    with pytest.raises(ReferenceFailure, match="SCF not converged in 1 cycles"):
        compute_reference(molecule("CH3CH2OH"), ReferenceConfig(max_iterations=1))
    with pytest.raises(ReferenceFailure, match="PySCF SCF not converged in 1 cycles"):
        compute_reference(
            molecule("H2O"), ReferenceConfig(kind="pyscf", basis="sto-3g", max_iterations=1)
        )


def test_nan_timeout_and_crash_are_reference_failures():
    atoms = bulk("Cu", "fcc", a=3.6).repeat(2)
    nan = ReferenceConfig(kind="ase", calculator=FLAKY, kwargs={"mode": "nan"})
    with pytest.raises(ReferenceFailure, match="non-finite"):
        compute_reference(atoms, nan)
    sleepy = ReferenceConfig(kind="ase", calculator=FLAKY, kwargs={"mode": "sleep"}, timeout_s=1)
    with pytest.raises(ReferenceFailure, match=r"timed out after 1 s \(reference.timeout_s\)"):
        compute_reference(atoms, sleepy)
    crashing = ReferenceConfig(kind="ase", calculator=FLAKY, kwargs={"mode": "exit"}, timeout_s=30)
    with pytest.raises(ReferenceFailure, match=r"reference process died \(exit code 3\)"):
        compute_reference(atoms, crashing)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kind": "foo"}, "reference.kind: Input should be 'xtb', 'pyscf', 'emt' or 'ase'"),
        ({"kind": "ase"}, "reference.calculator: required when reference.kind is 'ase'"),
        ({"kind": "ase", "calculator": "no_such_module:Calc"}, "reference.calculator: cannot"),
        ({"kind": "ase", "calculator": "ase.calculators.emt:Nope"}, "reference.calculator: cannot"),
        ({"kind": "ase", "calculator": FLAKY, "kwargs": {"mode": 0}}, "reference.kwargs: rejected"),
        ({"kind": "xtb", "method": "GFN9-xTB"}, "reference.method: unknown xtb method"),
        ({"kind": "pyscf", "method": "nonsense"}, "reference.method: unknown functional"),
        ({"kind": "pyscf", "basis": "nonsense"}, "reference.basis: unknown basis set"),
        ({"kind": "emt", "calculator": FLAKY}, "reference.calculator: only used when"),
        ({"fallback": {"electronic_temprature": 1e3}}, "reference.fallback: unknown setting"),
        ({"fallback": {"max_iterations": 0}}, "reference.fallback.max_iterations"),
    ],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(ConfigError) as err:
        validate_reference(settings)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_settings_in_a_config_file_and_at_build_time():
    with pytest.raises(ConfigError, match=r"x\.yaml: reference\.kind: Input should be"):
        config_from_dict({"reference": {"kind": "foo"}}, source="x.yaml")
    with pytest.raises(ConfigError, match=r"reference\.calculator: required"):
        build_reference(ReferenceConfig(kind="ase"))
    with pytest.raises(ConfigError, match=r"reference\.calculator: cannot import 'nope:X'"):
        build_reference({"kind": "ase", "calculator": "nope:X"})


def test_pyscf_rejects_periodic_cells():
    with pytest.raises(ConfigError, match=r"reference\.kind 'pyscf': periodic cells are not supp"):
        build_reference(ReferenceConfig(kind="pyscf"), bulk("Cu"))


@pytest.mark.parametrize("target", ["os:system", "subprocess:run", "builtins:print"])
def test_a_config_cannot_call_arbitrary_code(tmp_path, target):
    marker = tmp_path / "pwned"
    settings = {"kind": "ase", "calculator": target, "kwargs": {"command": f"touch {marker}"}}
    with pytest.raises(ConfigError) as err:
        validate_reference(settings)
    assert "is not an ASE calculator class" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="is not an ASE calculator class"):
        build_reference(settings)
    assert not marker.exists()  # nothing ran
    config = tmp_path / "evil.yaml"
    config.write_text(
        "reference:\n  kind: ase\n"
        f"  calculator: '{target}'\n  kwargs: {{command: 'touch {marker}'}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mlforce.cli", "run", str(config), "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not an ASE calculator class" in proc.stderr
    assert not marker.exists() and not (tmp_path / "r").exists()


def test_reference_follows_the_callers_thread_count():
    # A flow task sets its thread count (set_threads); the reference's OpenMP must follow it,
    # in process and in the child that enforces timeout_s (2 threads per task with passive
    # waits made labels and training 2-6x slower on 2 cores).
    import torch

    from mlforce.device import set_threads, task_threads, usable_cores

    assert task_threads(2, 3) == 3
    assert task_threads(2) == max(1, usable_cores() // 2)
    atoms = bulk("Cu", "fcc", a=3.6)
    cfg = ReferenceConfig(kind="ase", calculator="mlforce_test_calcs:OpenMPThreads")
    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            set_threads(n)
            assert compute_reference(atoms, cfg).energy == n
            child = cfg.model_copy(update={"timeout_s": 60.0})
            assert compute_reference(atoms, child).energy == n
    finally:
        set_threads(before)
