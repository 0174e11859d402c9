"""Lock-step walkers (one batched model call per step) give what one-by-one walkers give."""

from __future__ import annotations

import numpy as np
import pytest

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import MDConfig, ReferenceConfig, TriggerConfig
from mlforce.lockstep import Lockstep, LockstepCalculator, run_walkers
from mlforce.store import LabelStore


def md_config(**triggers) -> MDConfig:
    return MDConfig(
        steps=40, temperatures=[500.0], trajectory_every=5,
        triggers=TriggerConfig(**{"min_gap": 5, "check_every": 2, **triggers}),
    )  # fmt: skip


@pytest.mark.parametrize("prediction", ["deterministic", "sample"])
def test_lockstep_equals_one_by_one(trained_checkpoint, xtb_frames, tmp_path, prediction):
    calc = MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=4, prediction=prediction)
    cfg = md_config(lower=0.05, upper=50.0, mode="collect", audit_probability=0.1)
    temps, seeds = [300.0, 500.0, 700.0], [3, 4, 5]
    runs = {}
    for lockstep in (False, True):
        starts = [xtb_frames[k].copy() for k in (0, 3, 6)]
        cands: list[list] = [[] for _ in starts]
        summaries = run_walkers(
            calc, starts, temps, cfg, seeds, lockstep=lockstep,
            per_walker=[{"candidates": c} for c in cands],
        )  # fmt: skip
        runs[lockstep] = (starts, cands, summaries)
    (a0, c0, s0), (a1, c1, s1) = runs[False], runs[True]
    assert [s.walker for s in s1] == [0, 1, 2]
    assert sum(s.candidates for s in s0) > 0  # the comparison covers triggers, not only motion
    for k in range(3):
        assert s0[k].steps == s1[k].steps == 40
        assert [f.info["md_step"] for f in c0[k]] == [f.info["md_step"] for f in c1[k]]
        assert np.allclose(
            [f.info["max_force_std"] for f in c0[k]], [f.info["max_force_std"] for f in c1[k]],
            atol=1e-5,
        )  # fmt: skip
        assert np.allclose(a0[k].get_positions(), a1[k].get_positions(), atol=1e-5)
    if prediction == "sample":  # each walker its own sample: not the dropout-free trajectory
        runs_det = [xtb_frames[k].copy() for k in (0, 3, 6)]
        det = MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=4)
        run_walkers(det, runs_det, temps, cfg, seeds, lockstep=False)
        for k in range(3):
            assert np.abs(runs_det[k].get_positions() - a0[k].get_positions()).max() > 1e-3


def test_lockstep_batches_every_walker_in_one_call(trained_checkpoint, xtb_frames):
    calc = MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=4)
    group = Lockstep(calc, 4)
    from concurrent.futures import ThreadPoolExecutor

    def one(i):
        atoms = xtb_frames[i].copy()
        atoms.calc = LockstepCalculator(group, i)
        try:
            return atoms.get_forces(), atoms.calc.results["max_force_std"]
        finally:
            group.leave()

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(one, range(4)))
    assert group.batches == 1 and group.structures == 4
    for i, (forces, sigma) in enumerate(out):
        ref = calc.predict([xtb_frames[i]])[0]
        assert np.allclose(forces, ref["forces"], atol=1e-5)
        assert abs(sigma - ref["max_force_std"]) < 1e-5


def test_lockstep_walker_that_labels_on_the_fly(trained_checkpoint, xtb_frames, tmp_path):
    """A walker calling the reference holds the others; labels land with their provenance."""
    calc = MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=4)
    store = LabelStore(tmp_path / "labels.db")
    cfg = md_config(lower=0.02, upper=50.0, label_budget=2)
    starts = [xtb_frames[k].copy() for k in (0, 5)]
    summaries = run_walkers(calc, starts, [500.0, 500.0], cfg, [1, 2], store=store,
                            reference=ReferenceConfig())  # fmt: skip
    rows = store.rows()
    assert len(rows) == sum(s.n_labels for s in summaries) > 0
    assert {r["walker"] for r in rows} <= {0, 1}
    assert all(s.steps == 40 for s in summaries)


def test_campaign_lockstep_round_equals_walker_tasks(tiny_campaign, tmp_path):
    """The flow's lock-step simulate (used on CUDA) writes what the per-walker tasks write."""
    import shutil

    from ase.io import read

    from mlforce import campaign

    src, _ = tiny_campaign
    out = {}
    for mode in ("tasks", "lockstep"):
        root = tmp_path / mode
        shutil.copytree(src, root)
        run = campaign.RunDir(root)
        specs = campaign.walker_specs(run.config())
        if mode == "tasks":
            rows = [campaign.simulate_walker(run, 1, s) for s in specs]
        else:
            rows = campaign.simulate_walkers(run, 1, specs)
        out[mode] = [(r["walker"], r["steps"], r["candidates"],
                      [f.info["md_step"] for f in read(r["candidates_file"], ":")])
                     for r in rows]  # fmt: skip
    assert out["tasks"] == out["lockstep"]
    assert sum(r[2] for r in out["tasks"]) > 0


def test_walkers_start_from_earlier_labels_when_asked(tiny_campaign, tmp_path):
    """md.start: labelled puts md.replicas walkers on labelled frames of earlier rounds."""
    import shutil

    import numpy as np
    import yaml

    from mlforce import campaign
    from mlforce.md import load_start_structure
    from mlforce.store import LabelStore

    src, _ = tiny_campaign
    root = tmp_path / "labelled"
    shutil.copytree(src, root)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["md"].update(start="labelled", replicas=3)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = campaign.RunDir(root)
    config = run.config()
    specs = campaign.walker_specs(config)
    assert len(specs) == 3 * len(config.md.structures) * len(config.md.temperatures)
    assert [s["walker"] for s in specs] == list(range(len(specs)))
    earlier = LabelStore(run.ledger).atoms(status="ok", selection="iteration<2")
    later = LabelStore(run.ledger).atoms(status="ok", selection="iteration>=2")
    starts = [campaign.walker_start(run, 2, s) for s in specs]
    for atoms in starts:
        assert atoms.calc is None and not atoms.info
        assert any(np.array_equal(atoms.positions, a.positions) for a in earlier)
        assert not any(np.array_equal(atoms.positions, a.positions) for a in later)
    again = [campaign.walker_start(run, 2, s) for s in specs]
    assert all(np.array_equal(a.positions, b.positions) for a, b in zip(starts, again))
    assert len({a.positions.tobytes() for a in starts}) > 1  # walkers spread over the labels
    # the shipped library default: every walker on its start structure
    cfg["md"]["start"] = "structure"
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    plain = campaign.walker_start(run, 2, specs[0])
    np.testing.assert_array_equal(
        plain.positions, load_start_structure(specs[0]["structure"]).positions
    )


def test_walkers_continue_where_they_ended_when_asked(tiny_campaign, tmp_path):
    """md.start: continue starts each walker of round k on its own last accepted frame of
    round k - 1 (guard and rollback frames skipped); round 1 on the start structure."""
    import shutil

    import numpy as np
    import yaml
    from ase.io import read, write

    from mlforce import campaign
    from mlforce.md import load_start_structure

    src, _ = tiny_campaign
    root = tmp_path / "continue"
    shutil.copytree(src, root)
    cfg = yaml.safe_load((root / "config.yaml").read_text())
    cfg["md"].update(start="continue")
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    run = campaign.RunDir(root)
    specs = campaign.walker_specs(run.config())
    first = campaign.walker_start(run, 1, specs[0])
    np.testing.assert_array_equal(
        first.positions, load_start_structure(specs[0]["structure"]).positions
    )

    def accepted(frame):
        decision = str(frame.info.get("decision", ""))
        return not decision.startswith("guard") and decision != "rollback"

    for spec in specs:
        traj = read(run.round_dir(1) / f"walker_{spec['walker']}.extxyz", ":")
        start = campaign.walker_start(run, 2, spec)
        assert start.calc is None and not start.info
        last = [f for f in traj if accepted(f)][-1]
        assert last.info["md_step"] > 0  # not the start structure again
        np.testing.assert_array_equal(start.positions, last.positions)
    # a later frame rejected by a guard is skipped: the accepted one before it is taken
    path = run.round_dir(1) / f"walker_{specs[0]['walker']}.extxyz"
    traj = read(path, ":")
    good = traj[-1].copy()
    good.positions += 0.01
    good.info.update(decision="trust", md_step=traj[-1].info["md_step"] + 1)
    bad = traj[-1].copy()
    bad.positions += 5.0
    bad.info.update(decision="guard:bonds", md_step=traj[-1].info["md_step"] + 2)
    write(path, [*traj, good, bad], format="extxyz")
    start = campaign.walker_start(run, 2, specs[0])
    np.testing.assert_allclose(start.positions, good.positions, atol=1e-7)  # extxyz digits
