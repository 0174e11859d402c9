"""The CUDA path gives what the CPU path gives (skipped where torch sees no CUDA device).

Run on a GPU machine with ``pytest -m gpu``. The CPU path of everything here is covered by the
rest of the suite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import Config, MDConfig, TriggerConfig
from mlforce.graph import atoms_to_graph, batch_graphs
from mlforce.lockstep import run_walkers
from mlforce.uncertainty import mc_predict
from tests.conftest import make_model

pytestmark = pytest.mark.gpu


def test_mc_predict_on_cuda_matches_cpu(xtb_frames):
    model = make_model(species=(1, 6, 8), node=0.1, edge=0.1, dtype="float64")
    graphs = [atoms_to_graph(a, model.species, 4.0, torch.float64) for a in xtb_frames[:5]]
    cpu = mc_predict(model, batch_graphs(graphs), 8, seed=3)
    gpu = mc_predict(model.to("cuda"), batch_graphs(graphs).to("cuda"), 8, seed=3)
    assert torch.allclose(cpu.forces_samples, gpu.forces_samples.cpu(), atol=1e-8)
    assert torch.allclose(cpu.max_force_std, gpu.max_force_std.cpu(), atol=1e-8)
    assert float(cpu.max_force_std.min()) > 0


def test_calculator_auto_device_uses_cuda(trained_checkpoint, xtb_frames):
    gpu = MLForceCalculator(trained_checkpoint, device="auto", mc_samples=8)
    cpu = MLForceCalculator(trained_checkpoint, device="cpu", mc_samples=8)
    assert gpu.device.type == "cuda"
    a, b = xtb_frames[7].copy(), xtb_frames[7].copy()
    a.calc, b.calc = gpu, cpu
    assert np.allclose(a.get_forces(), b.get_forces(), atol=1e-4)
    assert abs(a.calc.results["max_force_std"] - b.calc.results["max_force_std"]) < 1e-4


def test_training_on_cuda_learns(xtb_frames):
    from mlforce.train import train_models

    config = Config.model_validate({
        "device": "cuda", "model": {"features": 16, "blocks": 2, "cutoff": 4.5},
        "training": {"max_epochs": 15, "max_minutes": None, "batch_size": 8, "lr": 3e-3,
                     "patience": 100, "seed": 0},
    })  # fmt: skip
    result = train_models(xtb_frames[:100], xtb_frames[100:], config, log=lambda m: None)
    model = result.models[0]
    assert next(model.parameters()).device.type == "cuda"
    assert result.metrics["device"].startswith("cuda")
    curve = result.history[0]
    assert curve[-1]["val_force_mae"] < 0.7 * curve[0]["val_force_mae"]


def test_lockstep_walkers_on_cuda_equal_one_by_one(trained_checkpoint, xtb_frames):
    calc = MLForceCalculator(trained_checkpoint, device="cuda", mc_samples=8)
    cfg = MDConfig(steps=30, temperatures=[500.0], trajectory_every=10,
                   triggers=TriggerConfig(lower=1e9, upper=2e9, check_every=3))  # fmt: skip
    finals = []
    for lockstep in (False, True):
        starts = [xtb_frames[k].copy() for k in range(4)]
        s = run_walkers(calc, starts, [500.0] * 4, cfg, [0, 1, 2, 3], lockstep=lockstep)
        assert all(w.steps == 30 for w in s)
        finals.append([a.get_positions() for a in starts])
    for p0, p1 in zip(*finals, strict=True):
        assert np.allclose(p0, p1, atol=1e-4)
