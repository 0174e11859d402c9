"""Uncertainty-driven dynamics in the model's latent space: a bias toward new environments.

A model trained on one conformer cannot know the others, and plain MD with it rarely crosses
into them: its barriers there are guesses. The bias lowers the potential energy where the
atoms' environments are far from the training atoms in the model's own features (the latent
distance d of :mod:`mlforce.latent`), bounded as in uncertainty-driven dynamics (Kulichenko et
al., J. Phys. Chem. Lett. 12, 6227 (2021), with d in place of the committee variance):

    E_bias = A · (exp(-Σ_i d_i² / (N B²)) - 1)        (per structure, eV; -A < E_bias ≤ 0)

with N the structure's atoms, A the ``strength`` (eV) and B the ``width`` (latent distance
units). The bias force -∇E_bias pushes toward larger d, most strongly where Σd²/N ≈ B²/2, and
vanishes far out, so that a walker gains at most A by leaving the known region: enough to
cross a soft barrier (a torsion) into a new conformer, not to break a bond. The nearest
training atom of each atom is held fixed within a step (a KD-tree query); d is differentiable
through the features. Campaign walkers only (``md.bias``); the labels are the reference's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mlforce.latent import LatentReference
from mlforce.model import _batch_vector, _num_graphs


def latent_bias(
    model: Any, graph: Any, latent: LatentReference, strength: float | Tensor, width: float
) -> tuple[Tensor, Tensor]:
    """Bias energy (B,) in eV and its forces (n, 3) in eV/Å for the structures of ``graph``.

    ``model``: the checkpoint's (dropout-free) model; ``latent``: its training atoms'
    features; ``strength`` A (eV; a number, or one per structure, shape (B,)) and ``width`` B
    (> 0, latent distance units) as in the module docstring. Atoms of an element absent from
    the training data are left out of Σd².
    """
    if width <= 0:
        raise ValueError(f"bias width must be > 0, got {width}")
    pos = graph.pos.detach().requires_grad_(True)
    with torch.enable_grad():
        feats = model.atom_features(graph, positions=pos)
        x = (feats.double() - torch.as_tensor(latent.mean, device=pos.device)) / torch.as_tensor(
            latent.std, device=pos.device
        )
        target, known = latent.nearest(x.detach().cpu().numpy(), graph.numbers.cpu().numpy())
        target_t = torch.as_tensor(target, dtype=x.dtype, device=pos.device)
        known_t = torch.as_tensor(known, device=pos.device)
        d2 = ((x - target_t) ** 2).sum(1) * known_t
        batch = _batch_vector(graph)
        n_graphs = _num_graphs(graph)
        total = torch.zeros(n_graphs, dtype=d2.dtype, device=pos.device).index_add(0, batch, d2)
        counts = torch.bincount(batch, minlength=n_graphs).clamp_min(1).to(d2.dtype)
        energy = strength * (torch.exp(-total / (counts * width**2)) - 1.0)
        (grad,) = torch.autograd.grad(energy.sum(), pos)
    return energy.detach(), -grad.detach().to(graph.pos.dtype)
