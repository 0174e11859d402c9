"""Self-describing checkpoints: weights + model config + species + cutoff + shifts + version.

A checkpoint is one ``torch.save`` file holding only plain tensors and JSON-able values, loaded
with ``torch.load(..., weights_only=True)``: loading can never run code. A committee (deep
ensemble) is one checkpoint with several ``members``. Every function that takes a checkpoint
path also accepts the directory that holds ``model.pt``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from mlforce import __version__
from mlforce.config import ModelConfig
from mlforce.errors import CheckpointError
from mlforce.latent import LatentReference
from mlforce.model import ForceField

FORMAT = "mlforce-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "model.pt"


def resolve_checkpoint_path(path: str | Path) -> Path:
    """``DIR`` -> ``DIR/model.pt``; a missing file is a :class:`CheckpointError`."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


@dataclass
class Checkpoint:
    """A loaded checkpoint: one model (or a committee), its calibration and metadata."""

    models: list[ForceField]
    calibration: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # training atoms' features: σ is combined with the latent distance (None: MC σ alone)
    latent: LatentReference | None = None

    @property
    def model(self) -> ForceField:
        """The first (for a single model, the only) member."""
        return self.models[0]

    @property
    def species(self) -> list[int]:
        return self.models[0].species

    @property
    def mc_samples(self) -> int:
        """MC samples T the calibration was fitted with (its σ scale fits that T); else 16."""
        return int(self.calibration.get("mc_samples", 16))

    @property
    def local_radius(self) -> float | None:
        """Å: max_force_std is that of the worst neighbourhood of this radius (None: atom)."""
        radius = self.calibration.get("local_radius")
        return float(radius) if radius else None

    @property
    def cutoff(self) -> float:
        return self.models[0].cutoff

    @property
    def is_ensemble(self) -> bool:
        return len(self.models) > 1

    def to(self, device: torch.device | str) -> Checkpoint:
        for m in self.models:
            m.to(device)
        return self


def _plain_state(model: ForceField) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    models: ForceField | list[ForceField],
    calibration: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    latent: LatentReference | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename). Returns the file path.

    ``latent``: the training atoms' features (:class:`mlforce.latent.LatentReference`); a model
    loaded from it reports σ combined with the latent distance."""
    members = models if isinstance(models, list) else [models]
    first = members[0]
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mlforce_version": __version__,
        "species": list(first.species),
        "cutoff": float(first.cutoff),
        "model": first.config.model_dump(),
        "members": [_plain_state(m) for m in members],
        "calibration": dict(calibration or {}),
        "metadata": dict(metadata or {}),
    }
    if latent is not None:
        payload["latent"] = latent.to_dict()
    path = Path(path)
    if path.suffix != ".pt":
        path = path / CHECKPOINT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint`; refuses anything else clearly."""
    p = resolve_checkpoint_path(path)
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{p}: refused to load: it holds Python objects beyond plain tensors "
            "(not an mlforce checkpoint, or unsafe)"
        ) from None
    except Exception as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint ({msg})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an mlforce checkpoint")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {version} is incompatible with this mlforce "
            f"{__version__} (reads version {FORMAT_VERSION}); retrain or convert it"
        )
    try:
        config = ModelConfig.model_validate(payload["model"])
        models = []
        for state in payload["members"]:
            model = ForceField(payload["species"], config)
            model.load_state_dict(state)
            models.append(model.to(device).eval())
        latent = LatentReference.from_dict(payload["latent"]) if "latent" in payload else None
    except (KeyError, ValidationError, RuntimeError, ValueError, TypeError) as err:
        msg = str(err).splitlines()[0]
        raise CheckpointError(f"{p}: checkpoint is damaged or incompatible ({msg})") from None
    calibration, metadata = payload.get("calibration", {}), payload.get("metadata", {})
    return Checkpoint(models, calibration, metadata, p, latent)


def checkpoint_hash(path: str | Path) -> str:
    """Short SHA-256 of the checkpoint file: the ``model_hash`` recorded with labels."""
    p = resolve_checkpoint_path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
