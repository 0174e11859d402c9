"""PaiNN interaction blocks (Schütt et al., ICML 2021) with node-feature dropout and DropEdge.

Scalar features ``s`` (n, F) are rotation invariant; vector features ``v`` (n, 3, F) rotate
with the structure. Dropout acts on the hidden *scalar* layers only (the message MLP and the
update MLP), so every stochastic sample is still exactly invariant/equivariant. DropEdge scales
each edge's message by its weight (0 for a dropped pair).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import MessagePassing

from mlforce.nn.dropout import DropoutKeys, block_site, node_dropout

_NORM_EPS = 1e-8  # keeps d||v||/dv finite at v = 0


class _Context:
    """Per-forward data the blocks need for dropout (atom -> graph, atom index in graph)."""

    __slots__ = ("batch", "keys", "local_atom")

    def __init__(self, keys: DropoutKeys | None, batch: Tensor, local_atom: Tensor) -> None:
        self.keys = keys
        self.batch = batch
        self.local_atom = local_atom


class PaiNNMessage(MessagePassing):
    """Continuous-filter messages from neighbours j to centre i; aggregation is a sum."""

    def __init__(self, features: int, num_basis: int) -> None:
        super().__init__(aggr="add", node_dim=0)
        self.features = features
        self.phi_in = nn.Linear(features, features)
        self.phi_out = nn.Linear(features, 3 * features)
        # No bias: the filter is a linear map of basis * envelope, so it vanishes smoothly at
        # the cutoff and DropEdge/envelope weights can scale the (E, K) basis, not (E, 3F).
        self.filter = nn.Linear(num_basis, 3 * features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.phi_in, self.phi_out, self.filter):
            layer.reset_parameters()

    def forward(
        self,
        s: Tensor,
        v: Tensor | None,
        edge_index: Tensor,
        edge_filter_input: Tensor,
        envelope: Tensor,
        unit: Tensor,
        edge_weight: Tensor | None,
        ctx: _Context,
        rate: float,
        site: int,
    ) -> tuple[Tensor, Tensor]:
        """s (n, F), v (n, 3, F) or None (all zero), edge_index (2, E), basis (E, K),
        envelope (E,), unit (E, 3)."""
        hidden = torch.nn.functional.silu(self.phi_in(s))
        hidden = node_dropout(hidden, rate, ctx.keys, ctx.batch, ctx.local_atom, site)
        x = self.phi_out(hidden)  # (n, 3F)
        scale = envelope if edge_weight is None else envelope * edge_weight
        w = self.filter(edge_filter_input * scale.unsqueeze(1))  # (E, 3F)
        n, f = s.shape[0], self.features
        # v is None before the first message (all vector features zero): nothing to gather.
        vectors = None if v is None else v.reshape(n, 3 * f)
        out = self.propagate(edge_index, x=x, v=vectors, w=w, unit=unit)
        ds, dv = out.split([f, 3 * f], dim=1)
        dv = dv.reshape(n, 3, f)
        return s + ds, dv if v is None else v + dv

    def message(self, x_j: Tensor, v_j: Tensor | None, w: Tensor, unit: Tensor) -> Tensor:
        f = self.features
        a, b, c = (x_j * w).chunk(3, dim=1)  # chunk, not slices: cheaper backward
        # One expression when v_j exists: the same sum written as two statements changes the
        # order of autograd's gradient sums, hence training's float path, and the demo then
        # took another (worse) campaign path (docs/benchmarks.md 24).
        if v_j is None:
            dv = c.unsqueeze(1) * unit.unsqueeze(2)
        else:
            dv = v_j.reshape(-1, 3, f) * b.unsqueeze(1) + c.unsqueeze(1) * unit.unsqueeze(2)
        return torch.cat([a, dv.reshape(-1, 3 * f)], dim=1)


class PaiNNUpdate(nn.Module):
    """Per-atom mixing of scalar and vector channels."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features
        self.u = nn.Linear(features, features, bias=False)
        self.v = nn.Linear(features, features, bias=False)
        self.mlp_in = nn.Linear(2 * features, features)
        self.mlp_out = nn.Linear(features, 3 * features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.u, self.v, self.mlp_in, self.mlp_out):
            layer.reset_parameters()

    def forward(
        self, s: Tensor, v: Tensor, ctx: _Context, rate: float, site: int
    ) -> tuple[Tensor, Tensor]:
        uv, vv = self.u(v), self.v(v)  # (n, 3, F)
        vv_norm = torch.sqrt((vv * vv).sum(dim=1) + _NORM_EPS)
        hidden = torch.nn.functional.silu(self.mlp_in(torch.cat([s, vv_norm], dim=1)))
        hidden = node_dropout(hidden, rate, ctx.keys, ctx.batch, ctx.local_atom, site)
        a_vv, a_sv, a_ss = self.mlp_out(hidden).chunk(3, dim=1)
        dv = a_vv.unsqueeze(1) * uv
        ds = a_sv * (uv * vv).sum(dim=1) + a_ss
        return s + ds, v + dv


class Interaction(nn.Module):
    """One message + update block, with its own dropout sites."""

    def __init__(self, features: int, num_basis: int, index: int) -> None:
        super().__init__()
        self.index = index
        self.message = PaiNNMessage(features, num_basis)
        self.update = PaiNNUpdate(features)

    def reset_parameters(self) -> None:
        self.message.reset_parameters()
        self.update.reset_parameters()

    def forward(
        self,
        s: Tensor,
        v: Tensor | None,
        edge_index: Tensor,
        basis: Tensor,
        envelope: Tensor,
        unit: Tensor,
        edge_weight: Tensor | None,
        ctx: _Context,
        node_rate: float,
    ) -> tuple[Tensor, Tensor]:
        s, v = self.message(
            s, v, edge_index, basis, envelope, unit, edge_weight, ctx, node_rate,
            block_site(self.index, 0),
        )  # fmt: skip
        return self.update(s, v, ctx, node_rate, block_site(self.index, 1))


class Readout(nn.Module):
    """Atomic energy (n,) from scalar features, with optional dropout on its hidden layer."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, features // 2)
        self.out = nn.Linear(features // 2, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.hidden.reset_parameters()
        self.out.reset_parameters()

    def forward(self, s: Tensor, ctx: _Context, rate: float, site: int) -> Tensor:
        h = torch.nn.functional.silu(self.hidden(s))
        h = node_dropout(h, rate, ctx.keys, ctx.batch, ctx.local_atom, site)
        return self.out(h).squeeze(1)


__all__ = ["Interaction", "PaiNNMessage", "PaiNNUpdate", "Readout", "_Context"]
