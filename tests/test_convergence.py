"""The campaign's stop rule: a low trigger rate and, when asked, an accurate model on
independent reference frames (``active_learning.check``)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read

from mlforce import campaign
from mlforce.calculators.reference import compute_reference
from mlforce.campaign import CHECK_FILE, RunDir, convergence, convergence_note
from mlforce.config import Config, config_from_dict, load_config
from mlforce.errors import ConfigError
from mlforce.store import LabelStore, structure_hash
from tests.conftest import ROOT


def _config(check: float | None = None, audit: float | None = None) -> Config:
    al = {"max_rounds": 6, "target_triggers_per_ps": 3.0, "converged_rounds": 2}
    if check is not None:
        al["check"] = {"frames": 10, "target_force_mae": check}
    if audit is not None:
        al["audit_target"] = audit
        return config_from_dict({"active_learning": al,
                                 "md": {"triggers": {"audit_probability": 0.005}}})  # fmt: skip
    return config_from_dict({"active_learning": al})


def _round(
    rate: float, check: float | None = None, labels: int = 100, audit: float | None = None
) -> dict:
    row = {"triggers_per_ps": rate, "labels_total": labels, "audit_max_force_error": audit}
    if check is not None:
        row["check_force_mae"] = check
    return row


def test_trigger_rate_alone_stops_without_a_check():
    cfg = _config()
    assert convergence([_round(9.0), _round(2.0)], cfg) is None
    assert convergence([_round(2.0), _round(2.9)], cfg).startswith("converged")
    assert convergence([_round(2.0), _round(3.1)], cfg) is None
    assert convergence_note([_round(2.0), _round(2.9)], cfg) is None


def test_a_quiet_but_inaccurate_model_does_not_converge():
    cfg = _config(check=0.04)
    # docs/benchmarks.md 24: quiet from round 4 with a model 2x off target
    wrong = [_round(99.6, 0.21), _round(22.2, 0.12), _round(4.9, 0.093),
             _round(2.2, 0.079), _round(0.4, 0.0598)]  # fmt: skip
    assert convergence(wrong, cfg) is None
    assert "0.0598 > 0.04" in convergence_note(wrong, cfg)
    right = [*wrong, _round(0.9, 0.0338)]
    reason = convergence(right, cfg)
    assert reason.startswith("converged") and "0.0338 <= 0.04" in reason
    assert convergence_note(right, cfg) is None
    # no check score (its reference MD failed): the trigger rate alone, and the reason says so
    unknown = [_round(1.0), _round(1.0)]
    assert "no accuracy check" in convergence(unknown, cfg)
    assert convergence_note(unknown, cfg) is None


def test_audits_of_the_walkers_own_md_hold_back_a_quiet_model_that_is_wrong_there():
    cfg = _config(audit=0.3)
    # docs/benchmarks.md 40: the water campaign's rounds 2-3, quiet with two hydrogens of
    # different molecules 1 Å apart that σ did not see; the audits' errors did
    wrong = [_round(23.9, audit=0.945), _round(2.5, audit=0.742), _round(1.0, audit=0.70)]
    assert convergence(wrong, cfg) is None
    note = convergence_note(wrong, cfg)
    assert "0.700 > 0.3" in note and "fills its label budget" in note
    right = [*wrong, _round(1.0, audit=0.104)]
    reason = convergence(right, cfg)
    assert reason.startswith("converged") and "0.104 <= 0.3" in reason
    assert convergence_note(right, cfg) is None
    # a round without audits cannot be checked: the trigger rate alone, and the reason says so
    assert "no audits" in convergence([*wrong, _round(1.0)], cfg)
    # without the rule, the same rounds had converged on the trigger rate
    assert convergence(wrong, _config()).startswith("converged")
    # both checks: each must pass
    both = _config(check=0.04, audit=0.3)
    assert convergence([*wrong[:2], _round(1.0, 0.03, audit=0.7)], both) is None
    assert convergence([*wrong[:2], _round(1.0, 0.05, audit=0.1)], both) is None
    assert convergence([*wrong[:2], _round(1.0, 0.03, audit=0.1)], both).startswith("converged")


def test_an_audit_target_without_audits_is_a_config_error():
    with pytest.raises(ConfigError, match="audit_probability > 0"):
        config_from_dict({"active_learning": {"audit_target": 0.3},
                          "md": {"triggers": {"audit_probability": 0.0}}})  # fmt: skip


def test_the_round_and_label_limits_still_stop_an_inaccurate_campaign():
    cfg = _config(check=0.01)
    assert convergence([_round(1.0, 0.5)] * 6, cfg) == "max_rounds (6) reached"
    assert "label budget" in convergence([_round(1.0, 0.5, labels=400)] * 2, cfg)


def test_the_shipped_demo_checks_its_accuracy():
    check = load_config(ROOT / "configs" / "ethanol_xtb.yaml").active_learning.check
    assert check is not None and check.frames >= 20


def test_check_frames_are_reference_labelled_never_trained_on_and_scored(tiny_campaign):
    run_dir, state = tiny_campaign
    run = RunDir(run_dir)
    frames = read(run.root / CHECK_FILE, ":")
    assert len(frames) == run.config().active_learning.check.frames
    labelled = LabelStore(run.ledger).hashes()
    seeds = LabelStore(run.ledger).atoms(trigger="seed", status="ok")
    assert not {structure_hash(f) for f in frames} & set(labelled)
    # a reference MD of its own: not the seed MD's frames, and labelled by the reference
    assert not np.allclose(frames[0].positions, seeds[0].positions, atol=1e-3)
    result = compute_reference(frames[-1], run.config().reference)
    np.testing.assert_allclose(frames[-1].get_forces(), result.forces, atol=1e-3)  # extxyz digits
    for row in state["rounds"]:  # every round's model scored on them
        expected = campaign.test_errors(row["checkpoint"], [str(run.root / CHECK_FILE)])
        assert row["check_force_mae"] == next(iter(expected.values())) > 0


def test_the_final_model_gets_its_own_epochs():
    """active_learning.final_epochs: the model a campaign hands over trains longer than a
    round; rounds and an unset final_epochs keep round_epochs."""
    from mlforce.campaign import round_config
    from mlforce.config import Config

    config = Config.model_validate(
        {"training": {"max_epochs": 200}, "active_learning": {"round_epochs": 150}}
    )
    assert round_config(config, warm=False).training.max_epochs == 200
    assert round_config(config, warm=True).training.max_epochs == 150
    assert round_config(config, warm=True, final=True).training.max_epochs == 150
    config.active_learning.final_epochs = 300
    assert round_config(config, warm=True).training.max_epochs == 150
    assert round_config(config, warm=True, final=True).training.max_epochs == 300
