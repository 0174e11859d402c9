"""Uncertainty-driven MD on a real (weakly) trained model with GFN2-xTB as the reference."""

from __future__ import annotations

import itertools
import json
import sqlite3

import numpy as np
import pytest
from ase import Atoms

from mlforce.calculators.ml import MLForceCalculator
from mlforce.cli import main
from mlforce.config import MDConfig, ReferenceConfig, TriggerConfig
from mlforce.errors import ConfigError, StructureError
from mlforce.md import run_walker
from mlforce.store import PROVENANCE_KEYS, LabelStore
from tests.conftest import ROOT


def md_config(**triggers) -> MDConfig:
    return MDConfig(
        steps=60, temperatures=[500.0], trajectory_every=5,
        triggers=TriggerConfig(**{"min_gap": 5, **triggers}),
    )  # fmt: skip


@pytest.fixture
def calc(trained_checkpoint):
    return MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=8)


def start(frames):
    return frames[0].copy()


def test_infinite_threshold_never_calls_the_reference(calc, xtb_frames, tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    cfg = md_config(lower=1e9, upper=2e9)
    s = run_walker(calc, start(xtb_frames), 500.0, cfg, store=store, reference=ReferenceConfig())
    assert s.steps == 60 and s.stop_reason == "completed"
    assert len(store) == 0 and s.reference_seconds == 0.0 and s.n_labels == 0
    assert s.checks == 60 and s.sigma_mean > 0  # steps 1..60: step 0 is the start itself


def test_low_threshold_labels_with_full_provenance(calc, xtb_frames, tmp_path, trained_checkpoint):
    store = LabelStore(tmp_path / "labels.db")
    cfg = md_config(lower=1e-3, upper=50.0)
    traj = tmp_path / "walker.extxyz"
    s = run_walker(
        calc, start(xtb_frames), 500.0, cfg, seed=3, walker=2, iteration=4, store=store,
        reference=ReferenceConfig(), model_hash="m-abc", trajectory=traj,
    )  # fmt: skip
    assert s.labels.get("uncertainty", 0) >= 5
    assert len(store) == s.n_labels
    rows = store.rows()
    for row in rows:
        for key in PROVENANCE_KEYS:
            if key not in ("error", "attempts", "trigger_max_force_std"):  # the last: select
                assert key in row, key
        assert row["status"] == "ok" and row["walker"] == 2 and row["iteration"] == 4
        assert row["trigger"] == "uncertainty" and row["model_hash"] == "m-abc"
        assert row["max_force_std"] >= row["threshold"] == pytest.approx(1e-3)
        assert row["time_fs"] == pytest.approx(0.5 * row["md_step"])
        assert row["true_max_force_error"] > 0 and "structure_hash" in row
    steps = [r["md_step"] for r in rows]
    assert all(b - a >= 5 for a, b in itertools.pairwise(steps))  # min_gap respected
    from ase.io import read

    frames = read(traj, ":")
    assert {"max_force_std", "decision", "model_energy"} <= set(frames[-1].info)
    assert any(f.info["decision"] == "label" for f in frames)
    assert s.triggers_per_ps == pytest.approx(s.labels["uncertainty"] / 0.03)


def test_same_seed_same_triggers(calc, xtb_frames, tmp_path):
    runs = []
    for k in range(2):
        store = LabelStore(tmp_path / f"l{k}.db")
        cfg = md_config(lower=0.02, upper=50.0, audit_probability=0.1)
        s = run_walker(calc, start(xtb_frames), 500.0, cfg, seed=7, store=store,
                       reference=ReferenceConfig())  # fmt: skip
        runs.append([(r["md_step"], r["trigger"]) for r in store.rows()])
        assert s.n_labels > 0
    assert runs[0] == runs[1]


class ScriptedSigma(MLForceCalculator):
    """The real model's forces, with max_force_std replaced by a script of known values."""

    def __init__(self, *args, sigma_at, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma_at, self.calls = sigma_at, 0
        self.forces_log: list[np.ndarray] = []

    def calculate(self, atoms=None, properties=None, system_changes=()):
        super().calculate(atoms, properties, system_changes)
        sigma = self.sigma_at(self.calls)
        self.results["max_force_std"] = self.results["max_force_std_raw"] = sigma
        self.calls += 1

    def get_property(self, name, atoms=None, allow_calculation=True):
        value = super().get_property(name, atoms, allow_calculation)
        if name == "forces":
            self.forces_log.append(np.array(value))
        return value


def test_rollback_restores_last_trusted_positions_and_momenta(
    trained_checkpoint, xtb_frames, tmp_path
):
    from ase.io import read

    calc = ScriptedSigma(trained_checkpoint, device="cpu", mc_samples=4,
                         sigma_at=lambda k: 0.01 if k <= 30 else 10.0)  # fmt: skip
    atoms = start(xtb_frames)
    cfg = md_config(lower=0.5, upper=1.0, on_upper="stop", label_on_upper=False)
    cfg.thermostat = "nve"
    cfg.trajectory_every = 1
    traj = tmp_path / "t.extxyz"
    s = run_walker(calc, atoms, 300.0, cfg, seed=1, trajectory=traj)
    assert s.stop_reason == "upper" and s.rollbacks == 1 and s.steps == 31
    frames = {f.info["md_step"]: f for f in read(traj, ":")}
    assert frames[30].info["decision"] == "trust" and frames[31].info["decision"] == "rollback"
    # the walker ends in the state of step 30, the last trusted one, not of step 31
    assert np.allclose(atoms.get_positions(), frames[30].get_positions(), atol=1e-7)
    assert np.allclose(atoms.get_momenta(), frames[30].get_momenta(), atol=1e-7)
    assert not np.allclose(atoms.get_positions(), frames[31].get_positions(), atol=1e-4)


def test_on_the_fly_steps_continue_with_reference_forces(trained_checkpoint, xtb_frames, tmp_path):
    calc = ScriptedSigma(trained_checkpoint, device="cpu", mc_samples=4,
                         sigma_at=lambda k: 0.8 if k in (10, 20) else 0.01)  # fmt: skip
    store = LabelStore(tmp_path / "labels.db")
    cfg = md_config(lower=0.5, upper=5.0, min_gap=1)
    cfg.thermostat = "nve"
    s = run_walker(calc, start(xtb_frames), 300.0, cfg, store=store, reference=ReferenceConfig())
    assert s.labels == {"uncertainty": 2}
    refs = [a.get_forces() for a in store.atoms()]
    logged = calc.forces_log
    # the forces handed to the integrator after each label are the reference forces
    hits = [any(np.array_equal(f, ref) for f in logged) for ref in refs]
    assert all(hits)
    model_like = [f for f in logged if not any(np.array_equal(f, r) for r in refs)]
    assert len(model_like) > 40


def test_clash_stops_with_guard_and_labels_nothing(calc, tmp_path):
    atoms = Atoms("CH4", positions=[[0, 0, 0], [0.2, 0, 0], [-0.6, 0.9, 0], [-0.6, -0.9, 0],
                                    [0, 0, 1.1]])  # fmt: skip
    store = LabelStore(tmp_path / "labels.db")
    cfg = md_config(lower=1e-3, upper=50.0)
    s = run_walker(calc, atoms, 300.0, cfg, store=store, reference=ReferenceConfig())
    assert s.stop_reason == "guard:min_distance"
    assert s.guards == {"guard:min_distance": 1}
    assert len(store) == 0


def test_bad_input_fails_before_any_step(calc, trained_checkpoint, tmp_path, capsys):
    from ase.build import molecule

    with pytest.raises(StructureError, match="element Cl"):
        run_walker(calc, molecule("CH3Cl"), 300.0, md_config())
    with pytest.raises(ConfigError, match="temperature"):
        run_walker(calc, molecule("CH4"), 0.0, md_config())
    with pytest.raises(ValueError, match="lower"):
        TriggerConfig(lower=2.0, upper=1.0)
    structure = str(ROOT / "data" / "ethanol.xyz")
    base = ["md", str(trained_checkpoint), "--structure", structure, "--steps", "5"]
    assert main([*base, "--temperature", "-5"]) == 2
    assert "temperatures" in capsys.readouterr().err
    for bad in ("inf", "nan"):
        assert main([*base, "--temperature", bad]) == 2
        assert "finite and > 0 K" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="finite"):
        run_walker(calc, molecule("CH4"), float("inf"), md_config())
    foreign = tmp_path / "someone_elses.sqlite"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    before = foreign.read_bytes()
    assert main([*base, "--store", str(foreign)]) == 2
    assert "not a label ledger; refusing" in capsys.readouterr().err
    assert foreign.read_bytes() == before  # not touched
    assert main([*base, "--lower", "3", "--upper", "1"]) == 2
    assert "lower (3.0) must not exceed upper (1.0)" in capsys.readouterr().err
    assert main([*base, "--store", str(tmp_path / "nope" / "labels.db")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--json", "--lower", "100", "--upper", "200"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("steps", "simulated_fs", "labels", "triggers_per_ps", "rollbacks", "stop_reason"):
        assert key in out
    assert out["steps"] == 5 and out["labels"] == 0


def test_collect_with_restart_keeps_the_walker_at_the_edge_of_trust(calc, xtb_frames):
    """after_candidate=restart: every candidate is a few steps from a trusted snapshot."""
    first = start(xtb_frames)
    found = {}
    for mode in ("continue", "restart"):
        candidates: list = []
        cfg = md_config(mode="collect", lower=1e-6, upper=1e9, min_gap=10, check_every=5,
                        after_candidate=mode)  # fmt: skip
        cfg.steps = 200
        s = run_walker(calc, first.copy(), 500.0, cfg, seed=3, candidates=candidates)
        assert s.steps == 200 and len(candidates) == s.candidates > 5
        # nothing is trusted below σ = 1e-6: the only trusted snapshot is the start
        found[mode] = max(np.abs(c.positions - first.positions).max() for c in candidates)
        assert s.restarts_after_candidate == (len(candidates) if mode == "restart" else 0)
    assert found["restart"] < 0.5 * found["continue"]
    assert found["restart"] < 0.3  # Å: at most min_gap steps of thermal motion from the start


class PullingHydrogen(MLForceCalculator):
    """The real model, plus a constant force that pulls the hydroxyl H away from its O."""

    def __init__(self, *args, pull, **kwargs):
        super().__init__(*args, **kwargs)
        self.pull = pull  # eV/Å

    def calculate(self, atoms=None, properties=None, system_changes=()):
        super().calculate(atoms, properties, system_changes)
        o = atoms.get_chemical_symbols().index("O")
        h = self.hydroxyl_h
        direction = atoms.positions[h] - atoms.positions[o]
        forces = np.array(self.results["forces"])
        forces[h] += self.pull * direction / np.linalg.norm(direction)
        self.results["forces"] = forces


def test_a_walker_that_breaks_a_bond_is_rolled_back_not_labelled(trained_checkpoint, tmp_path):
    from ase.io import read

    atoms = read(ROOT / "data" / "ethanol.xyz")
    o = atoms.get_chemical_symbols().index("O")
    calc = PullingHydrogen(trained_checkpoint, device="cpu", mc_samples=4, pull=8.0)
    calc.hydroxyl_h = int(np.argsort(atoms.get_distances(o, range(len(atoms))))[1])
    cfg = md_config(lower=1e9, upper=2e9, max_restarts=1)  # σ never triggers: only guards act
    cfg.steps = 300
    traj = tmp_path / "walker.extxyz"
    store = LabelStore(tmp_path / "labels.db")
    s = run_walker(calc, atoms.copy(), 300.0, cfg, store=store, reference=ReferenceConfig(),
                   trajectory=traj)  # fmt: skip
    assert s.guards.get("guard:bonds", 0) == cfg.triggers.max_restarts + 1
    assert s.stop_reason == "max_restarts:guard:bonds" and s.rollbacks >= 1
    assert len(store) == 0  # a frame outside the start chemistry is never labelled blindly
    frames = read(traj, ":")
    tripped = [f for f in frames if f.info["decision"] == "guard:bonds"]
    assert len(tripped) == s.guards["guard:bonds"]
    assert all(f.get_distance(o, calc.hydroxyl_h) > 1.3 for f in tripped)
    # the same pull with the guard off (reactive chemistry): the walker goes past the break
    cfg.guards.keep_bonds = False
    cfg.steps = int(tripped[0].info["md_step"]) + 10
    s = run_walker(calc, atoms.copy(), 300.0, cfg)
    assert "guard:bonds" not in s.guards and s.steps > int(tripped[0].info["md_step"])
