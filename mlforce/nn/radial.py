"""Radial basis with a smooth cutoff.

The edge filter is ``(W @ bessel(r) + b) * envelope(r)``: the polynomial envelope of DimeNet
(p = 6) has value, first and second derivative zero at the cutoff, so energies and forces go
to zero smoothly as an atom leaves the cutoff sphere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class BesselBasis(nn.Module):
    """``sqrt(2/rc) * sin(n pi r / rc) / r`` for n = 1..N. Input (E,) Å, output (E, N)."""

    def __init__(self, cutoff: float, num_basis: int) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        self.register_buffer(
            "frequencies", math.pi * torch.arange(1, num_basis + 1, dtype=torch.float32) / cutoff
        )
        self.prefactor = math.sqrt(2.0 / cutoff)

    def reset_parameters(self) -> None:  # no trainable parameters
        pass

    def forward(self, distance: Tensor) -> Tensor:
        d = distance.unsqueeze(-1)
        return self.prefactor * torch.sin(self.frequencies.to(d.dtype) * d) / d


class PolynomialEnvelope(nn.Module):
    """DimeNet envelope u(r/rc), p = 6: u(rc) = u'(rc) = u''(rc) = 0; zero beyond rc."""

    def __init__(self, cutoff: float, exponent: int = 6) -> None:
        super().__init__()
        self.cutoff = float(cutoff)
        p = float(exponent)
        self.p = p
        self.a = -(p + 1.0) * (p + 2.0) / 2.0
        self.b = p * (p + 2.0)
        self.c = -p * (p + 1.0) / 2.0

    def reset_parameters(self) -> None:
        pass

    def forward(self, distance: Tensor) -> Tensor:
        x = distance / self.cutoff
        xp = x.pow(self.p)
        u = 1.0 + self.a * xp + self.b * xp * x + self.c * xp * x * x
        return torch.where(x < 1.0, u, torch.zeros_like(u))
