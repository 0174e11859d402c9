"""ForceField: total energy of each graph from PaiNN blocks, with per-species shift and scale.

``E_graph = sum_atoms (scale[z] * readout(s_atom) + shift[z])`` in eV. The shift and scale are
buffers fitted from the training data (:meth:`ForceField.fit_shift_scale`): least-squares
per-species energies, and the RMS of the reference force components.
Forces and stress are taken in :mod:`mlforce.forces`, never here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mlforce import keys
from mlforce.config import ModelConfig
from mlforce.nn.dropout import READOUT_SITE, DropoutKeys, block_site, edge_weights
from mlforce.nn.painn import Interaction, Readout, _Context
from mlforce.nn.radial import BesselBasis, PolynomialEnvelope


def edge_vectors(graph: Any, positions: Tensor | None = None, cell: Tensor | None = None) -> Tensor:
    """Edge vectors r_ij = r_j - r_i + S @ cell (E, 3) in Å, from (possibly strained) inputs."""
    pos = graph.pos if positions is None else positions
    cell = graph.cell if cell is None else cell
    src, dst = graph.edge_index[0], graph.edge_index[1]
    vec = pos[src] - pos[dst]
    if graph.cell_shift.numel():
        graph_of_edge = _batch_vector(graph)[dst]
        vec = vec + torch.einsum("ek,ekl->el", graph.cell_shift.to(vec.dtype), cell[graph_of_edge])
    return vec


def _batch_vector(graph: Any) -> Tensor:
    batch = getattr(graph, keys.BATCH, None)
    if batch is None:
        return torch.zeros(graph.pos.shape[0], dtype=torch.long, device=graph.pos.device)
    return batch


def _num_graphs(graph: Any) -> int:
    return int(graph.num_graphs) if hasattr(graph, "num_graphs") else 1


class ForceField(nn.Module):
    """PaiNN-style energy model. ``forward`` returns per-graph energies (B,) in eV."""

    def __init__(self, species: Sequence[int], config: ModelConfig | None = None) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.species = [int(z) for z in species]
        if len(set(self.species)) != len(self.species) or not self.species:
            raise ValueError(f"species must be distinct atomic numbers, got {self.species}")
        f = cfg.features
        self.cutoff = float(cfg.cutoff)
        self.embedding = nn.Embedding(len(self.species), f)
        self.basis = BesselBasis(cfg.cutoff, cfg.radial_basis)
        self.envelope = PolynomialEnvelope(cfg.cutoff)
        self.blocks = nn.ModuleList(
            [Interaction(f, cfg.radial_basis, index=b) for b in range(cfg.blocks)]
        )
        self.readout = Readout(f)
        self.register_buffer("atomic_shift", torch.zeros(len(self.species), dtype=torch.float64))
        self.register_buffer("atomic_scale", torch.ones(len(self.species)))
        n_dropout = (
            cfg.blocks if cfg.dropout_blocks is None else min(cfg.dropout_blocks, cfg.blocks)
        )
        self.first_dropout_block = cfg.blocks - n_dropout
        n_mc = n_dropout if cfg.mc_dropout_blocks is None else min(cfg.mc_dropout_blocks, n_dropout)
        self.first_mc_block = cfg.blocks - n_mc  # stochastic blocks in eval mode (MC sampling)
        self.reset_parameters()
        if cfg.dtype == "float64":
            self.double()

    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()
        self.readout.reset_parameters()

    @property
    def has_dropout(self) -> bool:
        """True when some dropout rate is non-zero (MC sampling gives a non-zero spread)."""
        first = self.first_stochastic_block
        blocks = range(first, self.config.blocks)
        return any(max(self.block_rates(b)) > 0 for b in blocks) or self.config.readout_dropout > 0

    def block_rates(self, block: int) -> tuple[float, float]:
        """(node, edge) dropout rates of ``block`` when it is stochastic."""
        c = self.config
        if block == c.blocks - 1:
            node = c.node_dropout if c.last_node_dropout is None else c.last_node_dropout
            edge = c.edge_dropout if c.last_edge_dropout is None else c.last_edge_dropout
            return node, edge
        return c.node_dropout, c.edge_dropout

    def set_mc_dropout_blocks(self, n: int | None) -> None:
        """Change where MC dropout acts at inference (refit the calibration afterwards)."""
        self.config = self.config.model_copy(update={"mc_dropout_blocks": n})
        n_dropout = self.config.blocks - self.first_dropout_block
        self.first_mc_block = self.config.blocks - (n_dropout if n is None else min(n, n_dropout))

    @property
    def first_stochastic_block(self) -> int:
        """First block with dropout: as trained in train mode, ``mc_dropout_blocks`` in eval."""
        return self.first_dropout_block if self.training else self.first_mc_block

    def fit_shift_scale(
        self, numbers: Sequence[np.ndarray], energies: Sequence[float], forces: np.ndarray
    ) -> None:
        """Fit per-species energy shifts (eV) by least squares and the scale (eV/Å).

        ``numbers``: atomic numbers per structure; ``energies``: reference energies (eV);
        ``forces``: all reference force components (eV/Å). With one composition only, the
        minimum-norm solution spreads the mean energy over the species.
        """
        counts = np.zeros((len(numbers), len(self.species)))
        index = {z: k for k, z in enumerate(self.species)}
        for row, zs in enumerate(numbers):
            for z in zs:
                counts[row, index[int(z)]] += 1
        e = np.asarray(energies, dtype=np.float64)
        shift, *_ = np.linalg.lstsq(counts, e, rcond=None)
        scale = float(np.sqrt(np.mean(np.asarray(forces, dtype=np.float64) ** 2)))
        scale = scale if scale > 1e-6 else 1.0
        self.atomic_shift.copy_(torch.as_tensor(shift, dtype=torch.float64))
        self.atomic_scale.fill_(scale)

    def forward(
        self,
        graph: Any,
        positions: Tensor | None = None,
        cell: Tensor | None = None,
        dropout: DropoutKeys | None = None,
        features: list[Tensor] | None = None,
    ) -> Tensor:
        """Energy per graph (B,) in eV, float64.

        ``positions`` (n, 3) and ``cell`` (B, 3, 3) replace the graph's own (forces and stress
        are gradients with respect to them). ``dropout`` switches dropout on with the given
        keys; ``None`` gives the deterministic model whatever ``self.training`` says. With keys,
        ``self.training`` picks only *where* dropout acts: the trained blocks in train mode,
        the last ``mc_dropout_blocks`` of them in eval mode (MC sampling). ``features``: a list
        that receives the invariant features after the last block (n, F), detached (for the
        dropout-off atoms, :meth:`atom_features` without a second pass).
        """
        s, ctx = self._scalar_features(graph, positions, cell, dropout)
        if features is not None:
            features.append(s.detach())
        species = graph.species
        atomic = self.readout(s, ctx, self.config.readout_dropout, READOUT_SITE)
        atomic = atomic * self.atomic_scale[species].to(atomic.dtype)
        # The large constant part (per-species shifts, ~ -100 eV/atom) is added in float64 so
        # float32 models keep meV resolution in total energies.
        atomic = atomic.to(torch.float64) + self.atomic_shift[species]
        energy = torch.zeros(_num_graphs(graph), dtype=torch.float64, device=atomic.device)
        return energy.index_add(0, ctx.batch, atomic)

    def atom_features(self, graph: Any, positions: Tensor | None = None) -> Tensor:
        """Invariant scalar features (n, F) of the dropout-free model after the last block.

        The model's own learned description of each atom's environment: a descriptor for
        diversity in selection (:func:`mlforce.selection.structure_descriptors`). Without
        ``positions`` no gradient is kept; with ``positions`` (n, 3, requiring grad) the
        features are differentiable with respect to them (:mod:`mlforce.bias`).
        """
        if positions is not None:
            return self._scalar_features(graph, positions, None, None)[0]
        with torch.no_grad():
            s, _ = self._scalar_features(graph, None, None, None)
        return s

    def _scalar_features(
        self,
        graph: Any,
        positions: Tensor | None,
        cell: Tensor | None,
        dropout: DropoutKeys | None,
    ) -> tuple[Tensor, _Context]:
        pos = graph.pos if positions is None else positions
        batch = _batch_vector(graph)
        vec = edge_vectors(graph, pos, cell)
        dist = torch.linalg.norm(vec, dim=1)
        unit = vec / dist.unsqueeze(1)
        basis = self.basis(dist)
        envelope = self.envelope(dist)
        s = self.embedding(graph.species).to(pos.dtype)
        v = None  # vector features (n, 3, F), all zero until the first message
        ctx = _Context(dropout, batch, graph.local_atom)
        first_stochastic = self.first_stochastic_block
        for b, block in enumerate(self.blocks):
            stochastic = b >= first_stochastic
            node_rate, edge_rate = self.block_rates(b) if stochastic else (0.0, 0.0)
            weight = None
            if stochastic:
                weight = edge_weights(
                    edge_rate, dropout, graph.edge_index, batch, graph.local_atom,
                    graph.cell_shift, block_site(b, 2), pos.dtype,
                )  # fmt: skip
            s, v = block(
                s, v, graph.edge_index, basis, envelope, unit, weight, ctx,
                node_rate,
            )  # fmt: skip
        return s, ctx

    def describe(self) -> dict[str, Any]:
        """JSON-able description: everything needed to rebuild the module."""
        return {"species": self.species, "model": self.config.model_dump()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
