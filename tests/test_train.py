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


def test_large_data_placement_applies_to_a_fresh_single_model_on_enough_frames(xtb_frames):
    """``model.large_data``: from ``frames`` frames on, a model trained from scratch gets the
    last-block dropout and the σ neighbourhood; fewer frames, a warm start or a committee
    keep the configured placement."""
    base = {
        "device": "cpu",
        "model": {"features": 16, "blocks": 2, "radial_basis": 8, "cutoff": 4.5,
                  "large_data": {"frames": 20, "dropout_blocks": 1, "node_dropout": 0.3,
                                 "edge_dropout": 0.15, "local_radius": 2.5, "max_epochs": 2}},
        "training": {"max_epochs": 1, "batch_size": 8, "threads": 1},
        "uncertainty": {"mc_samples": 4},
    }  # fmt: skip
    config = Config.model_validate(base)
    quiet = lambda m: None  # noqa: E731

    few = train_models(xtb_frames[:15], xtb_frames[15:19], config, log=quiet)  # 19 < 20
    model = few.models[0]
    assert model.first_dropout_block == 0 and model.config.node_dropout == 0.05
    assert "local_radius" not in few.calibration

    many = train_models(xtb_frames[:16], xtb_frames[16:20], config, log=quiet)  # 20 frames
    model = many.models[0]
    assert model.first_dropout_block == 1 and model.block_rates(1) == (0.3, 0.15)
    assert model.config.large_data is None  # the checkpoint says what the model is
    assert many.calibration["local_radius"] == 2.5
    assert many.metrics["epochs"] == 2 and few.metrics["epochs"] == 1  # its own schedule

    warm = train_models(xtb_frames[:16], xtb_frames[16:20], config, warm_start=few.models,
                        log=quiet)  # fmt: skip
    assert warm.models[0].first_dropout_block == 0 and "local_radius" not in warm.calibration

    committee = Config.model_validate({**base, "training": {**base["training"], "ensemble": 2}})
    assert committee.for_training_frames(1000) is committee


def test_swa_returns_the_uniform_average_of_the_constant_rate_phase(xtb_frames):
    """``training.swa_fraction``: the last phase runs at ``swa_lr`` and the model returned is
    the mean of the weights after each of its optimizer steps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    config = Config.model_validate({
        "device": "cpu",
        "model": {"features": 16, "blocks": 2, "radial_basis": 8, "cutoff": 4.5},
        "training": {"max_epochs": 4, "max_minutes": None, "batch_size": 8, "patience": 1,
                     "warmup_epochs": 1, "threads": 1, "swa_fraction": 0.5, "swa_lr": 7e-4},
    })  # fmt: skip
    steps: list[tuple[float, list[torch.Tensor]]] = []

    def record(optimizer, args, kwargs):
        params = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
        steps.append((optimizer.param_groups[0]["lr"], params))

    handle = register_optimizer_step_post_hook(record)
    try:
        result = train_models(xtb_frames[:24], xtb_frames[24:30], config, log=lambda m: None)
    finally:
        handle.remove()
    assert len(steps) == 4 * 3  # 24 frames, batches of 8, every epoch run (no early stop)
    phase = [params for lr, params in steps if lr == 7e-4]
    assert len(phase) == 6 and all(lr != 7e-4 for lr, _ in steps[:6])  # the last half
    mean = [torch.stack(ps).mean(0) for ps in zip(*phase)]
    final = list(result.models[0].parameters())
    for got, want in zip(final, mean):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # float32 running mean
    assert not torch.allclose(final[0], phase[-1][0])  # the average, not the last step
    assert "SWA over 6 steps" in result.metrics["stop_reason"]
