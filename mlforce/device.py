"""Device choice: ``auto`` picks CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

import torch

from mlforce.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda[:k]`` -> a torch device; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu or cuda)") from None
