"""Training: the same data and seed give the same model, however loaded the machine is."""

from __future__ import annotations

import itertools

import torch

from mlforce.config import Config
from mlforce.train import train_models


def _train(frames, monkeypatch=None, seconds_per_call: float = 0.0):
    config = Config.model_validate({
        "device": "cpu",
        "model": {"features": 16, "blocks": 2, "radial_basis": 8, "cutoff": 4.5},
        "training": {"max_epochs": 3, "max_minutes": 60, "batch_size": 8, "patience": 100,
                     "warmup_epochs": 1, "threads": 1},
    })  # fmt: skip
    if monkeypatch is not None:  # a slow, loaded machine: the clock runs on between calls
        ticks = itertools.count()
        monkeypatch.setattr("mlforce.train.time.perf_counter",
                            lambda: seconds_per_call * next(ticks))  # fmt: skip
    result = train_models(frames[:24], frames[24:30], config, log=lambda m: None)
    return result.models[0].state_dict()


def test_training_does_not_depend_on_wall_time_when_the_budget_does_not_bind(
    xtb_frames, monkeypatch
):
    fast = _train(xtb_frames)
    slow = _train(xtb_frames, monkeypatch, seconds_per_call=2.0)  # ~40 s of 3600: not binding
    assert fast.keys() == slow.keys()
    for key in fast:
        assert torch.equal(fast[key], slow[key]), key


def test_the_checkpoint_records_the_local_radius_and_refuses_one_beyond_the_cutoff(xtb_frames):
    import pytest

    from mlforce.errors import ConfigError

    def config(radius):
        return Config.model_validate({
            "device": "cpu",
            "model": {"features": 16, "blocks": 2, "radial_basis": 8, "cutoff": 4.5},
            "training": {"max_epochs": 1, "batch_size": 8, "threads": 1},
            "uncertainty": {"mc_samples": 4, "local_radius": radius},
        })  # fmt: skip

    result = train_models(xtb_frames[:16], xtb_frames[16:20], config(3.0), log=lambda m: None)
    assert result.calibration["local_radius"] == 3.0
    with pytest.raises(ConfigError, match="exceeds the model cutoff"):
        train_models(xtb_frames[:16], xtb_frames[16:20], config(6.0), log=lambda m: None)
