"""Self-describing checkpoints that can never run code when loaded."""

from __future__ import annotations

import pickle

import pytest
import torch

from mlforce.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from mlforce.errors import CheckpointError
from mlforce.forces import compute_forces
from mlforce.graph import atoms_to_graph, batch_graphs
from tests.conftest import make_model


def test_roundtrip_needs_only_the_path(tmp_path, ethanol):
    model = make_model(dtype="float32", node=0.1)
    path = save_checkpoint(tmp_path / "run", model, calibration={"method": "scale", "scale": 2.0})
    assert path == tmp_path / "run" / "model.pt"
    ckpt = load_checkpoint(tmp_path / "run")  # the directory is accepted too
    assert ckpt.species == model.species and ckpt.cutoff == model.cutoff
    assert ckpt.calibration["scale"] == 2.0
    g = batch_graphs([atoms_to_graph(ethanol, model.species, model.cutoff)])
    a = compute_forces(model, g, create_graph=False)
    b = compute_forces(ckpt.model, g, create_graph=False)
    assert torch.equal(a["forces"], b["forces"]) and torch.equal(a["energy"], b["energy"])
    # the float64 energy shift survives a float32 model
    assert ckpt.model.atomic_shift.dtype == torch.float64


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    with open(path, "wb") as fh:
        pickle.dump({"format": FORMAT, "payload": _Exploit()}, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)


def test_incompatible_version_and_garbage(tmp_path):
    model = make_model()
    path = save_checkpoint(tmp_path / "a", model)
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 999
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="incompatible"):
        load_checkpoint(path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing")
