"""The one place that differentiates energy into forces and stress.

forces = -dE/dr (eV/Å); stress = (1/V) dE/dε (eV/Å^3, ASE's sign convention) where ε is a
symmetric strain applied to positions and cell. ``create_graph`` is always passed explicitly:
True while training (the force loss is differentiated again), False at inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mlforce import keys
from mlforce.nn.dropout import DropoutKeys


def compute_forces(
    model: nn.Module,
    graph: Any,
    *,
    create_graph: bool,
    compute_stress: bool = False,
    dropout: DropoutKeys | None = None,
    features: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Energies (B,) eV, forces (n, 3) eV/Å and, optionally, stress (B, 3, 3) eV/Å^3.

    Stress is only meaningful for periodic graphs; molecules (zero cell) get zeros.
    ``features``: a list that receives the model's per-atom invariant features (n, F).
    """
    pos = graph.pos.detach().requires_grad_(True)
    inputs = [pos]
    cell = graph.cell
    if compute_stress:
        n_graphs = cell.shape[0]
        strain = torch.zeros(n_graphs, 3, 3, dtype=pos.dtype, device=pos.device)
        strain.requires_grad_(True)
        sym = 0.5 * (strain + strain.transpose(1, 2))
        batch = getattr(graph, keys.BATCH, None)
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        positions = pos + torch.einsum("ni,nij->nj", pos, sym[batch])
        cell = cell + torch.bmm(cell, sym)
        inputs.append(strain)
    else:
        positions = pos
    extra = {} if features is None else {"features": features}
    energy = model(graph, positions=positions, cell=cell, dropout=dropout, **extra)
    grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
    dpos = grads[0] if grads[0] is not None else torch.zeros_like(pos)
    out = {keys.ENERGY: energy, keys.FORCES: -dpos}
    if compute_stress:
        dstrain = grads[1] if grads[1] is not None else torch.zeros_like(cell)
        volume = torch.linalg.det(graph.cell).abs().to(dstrain.dtype)
        safe = torch.where(volume > 0, volume, torch.ones_like(volume))
        stress = dstrain / safe.view(-1, 1, 1)
        out[keys.STRESS] = torch.where(volume.view(-1, 1, 1) > 0, stress, torch.zeros_like(stress))
    if not create_graph:
        out = {k: v.detach() for k, v in out.items()}
    return out
