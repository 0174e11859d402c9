"""The campaign's stop rule: a low trigger rate and, when asked, an accurate model."""

from __future__ import annotations

from mlforce.campaign import convergence, convergence_note
from mlforce.config import Config, config_from_dict, load_config
from tests.conftest import ROOT


def _config(**al) -> Config:
    data = {"active_learning": {"max_rounds": 6, "target_triggers_per_ps": 3.0,
                                "converged_rounds": 2, **al}}  # fmt: skip
    return config_from_dict(data)


def _round(rate: float, val: float = 0.05, labels: int = 100) -> dict:
    return {"triggers_per_ps": rate, "val_force_mae": val, "labels_total": labels}


def test_trigger_rate_alone_stops_without_an_accuracy_target():
    cfg = _config()
    assert convergence([_round(9.0), _round(2.0)], cfg) is None
    assert convergence([_round(2.0), _round(2.9)], cfg).startswith("converged")
    assert convergence([_round(2.0), _round(3.1)], cfg) is None
    assert convergence_note([_round(2.0), _round(2.9)], cfg) is None


def test_a_quiet_but_inaccurate_model_does_not_converge():
    cfg = _config(target_val_force_mae=0.04)
    # the campaign of docs/benchmarks.md 24: quiet from round 4 with a model 2x off target
    wrong = [_round(99.6, 0.072), _round(22.2, 0.058), _round(4.9, 0.073),
             _round(2.2, 0.060), _round(0.4, 0.056)]  # fmt: skip
    assert convergence(wrong, cfg) is None
    assert "0.0560 > 0.04" in convergence_note(wrong, cfg)
    right = [*wrong, _round(0.9, 0.0303)]
    reason = convergence(right, cfg)
    assert reason.startswith("converged") and "0.0303 <= 0.04" in reason
    assert convergence_note(right, cfg) is None


def test_the_round_and_label_limits_still_stop_an_inaccurate_campaign():
    cfg = _config(target_val_force_mae=0.01)
    assert convergence([_round(1.0)] * 6, cfg) == "max_rounds (6) reached"
    assert "label budget" in convergence([_round(1.0, labels=400)] * 2, cfg)


def test_the_shipped_demo_asks_for_accuracy():
    cfg = load_config(ROOT / "configs" / "ethanol_xtb.yaml")
    assert cfg.active_learning.target_val_force_mae is not None
