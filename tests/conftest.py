"""Shared fixtures: small real models, real xTB-labelled ethanol frames, a trained checkpoint."""

from __future__ import annotations

import os

# Tests run tblite, torch and helper processes side by side on 2 cores: OpenMP threads that
# spin while waiting make each of them 100x slower under contention (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from mlforce.config import Config, GenerateConfig, ModelConfig, ReferenceConfig
from mlforce.model import ForceField

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device; none visible to torch"))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # under pytest-xdist (`make test` runs 2 workers) the cores are shared between the workers
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


def make_model(
    species=(1, 6, 8, 29),
    features=16,
    blocks=2,
    node=0.0,
    edge=0.0,
    readout=0.0,
    dtype="float64",
    cutoff=4.0,
    seed=0,
) -> ForceField:
    """A small, randomly initialised model with non-trivial shift/scale."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        cutoff=cutoff,
        features=features,
        blocks=blocks,
        radial_basis=8,
        node_dropout=node,
        edge_dropout=edge,
        readout_dropout=readout,
        dtype=dtype,
    )
    model = ForceField(list(species), cfg)
    with torch.no_grad():
        model.atomic_shift.copy_(torch.linspace(-3.0, -1.0, len(species), dtype=torch.float64))
        model.atomic_scale.fill_(0.7)
    return model.eval()


@pytest.fixture
def ethanol():
    return molecule("CH3CH2OH")


@pytest.fixture
def copper():
    atoms = bulk("Cu", "fcc", a=3.6)
    return atoms


@pytest.fixture(scope="session")
def xtb_frames():
    """120 GFN2-xTB-labelled ethanol frames from short Langevin MD at 300-800 K (real tblite)."""
    from mlforce.data import read_structures
    from mlforce.generate import reference_md

    start = read_structures(ROOT / "data" / "ethanol.xyz")[0]
    gen = GenerateConfig(interval=5, equilibration_steps=50)
    frames = []
    for k, temperature in enumerate((300.0, 550.0, 800.0)):
        frames += reference_md(start, ReferenceConfig(), temperature, 40, gen, seed=10 + k)
    return frames


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, xtb_frames):
    """A small model trained for a short while on real xTB frames, saved as a checkpoint."""
    from mlforce.checkpoint import save_checkpoint
    from mlforce.train import train_models

    config = Config.model_validate(
        {
            "device": "cpu",
            "model": {"features": 32, "blocks": 2, "radial_basis": 12, "cutoff": 4.5},
            "training": {
                "max_epochs": 25,
                "max_minutes": None,
                "batch_size": 8,
                "lr": 3e-3,
                "patience": 100,
                "seed": 0,
            },
        }
    )
    frames = xtb_frames
    result = train_models(frames[:100], frames[100:], config, log=lambda m: None)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, result.models, metadata={"training": result.metrics})
    return path


def distorted_ethanol(n: int, scale: float, seed: int) -> list:
    """``n`` copies of ASE's ethanol with Gaussian displacements of ``scale`` Å (seeded)."""
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.positions += rng.normal(scale=scale, size=atoms.positions.shape)
        out.append(atoms)
    return out


def random_rotation(seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect server (temporary database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def tiny_campaign(prefect_harness, tmp_path_factory):
    """A real two-round campaign of configs/tiny.yaml (xTB reference): (run_dir, state)."""
    from flows.active_learning import run_campaign

    run_dir = tmp_path_factory.mktemp("campaign") / "run"
    state = run_campaign(str(ROOT / "configs" / "tiny.yaml"), str(run_dir))
    return run_dir, state
