"""Node-feature dropout and DropEdge with explicit, seeded, batch-independent masks.

Dropout is off unless a :class:`DropoutKeys` is passed to the model: ``model.training`` is
never consulted. Each graph in a batch carries its own 31-bit key. The random number behind a
mask element is a counter-based hash of (graph key, site, atom index *within its own graph*,
channel), so:

* a graph's masks do not depend on what else is in the batch (no leaking across graphs);
  batched and one-by-one evaluation with the same keys give the same result;
* the same keys give the same masks on CPU and CUDA, and different keys give independent masks;
* DropEdge hashes the *unordered* pair (both atoms, and the cell shift up to sign), so both
  directions of a pair are dropped together.

Training draws the graph keys from a seeded ``torch.Generator``; MC sampling derives them from
the configured seed and the sample index (:meth:`DropoutKeys.for_samples`).
Kept elements are scaled by ``1 / (1 - p)`` (inverted dropout), for nodes and edges alike, so
the dropout-free model sees messages of the same expected size as in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # < 2**31: products with 32-bit values stay inside int64
_SHIFT_OFFSET = 1 << 15  # makes cell-shift components non-negative counters

# Dropout site ids: distinct per place in the network so masks there are independent.
READOUT_SITE = 1_000_003


def block_site(block: int, which: int) -> int:
    """Site id of mask ``which`` (0: message nodes, 1: update nodes, 2: edges) in ``block``."""
    return 8 * block + which + 1


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xorshift-multiply), on int64 tensors holding [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    x = x ^ (x >> 16)
    return x


def hash_combine(h: Tensor, counter: Tensor | int) -> Tensor:
    """Fold a non-negative counter (< 2**32) into hash state ``h`` (broadcasting)."""
    if isinstance(counter, int):
        counter = torch.tensor(counter, dtype=torch.long, device=h.device)
    return _mix32(h ^ ((counter * _GOLDEN) & _MASK32))


def uniform_from_hash(h: Tensor, dtype: torch.dtype) -> Tensor:
    """Map 32-bit hashes to floats in [0, 1) using their top 24 bits."""
    return (h >> 8).to(dtype) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class DropoutKeys:
    """Switches dropout on for one forward pass.

    ``graph_keys``: (B,) long, one key per graph. ``active``: optional (B,) bool; graphs with
    ``False`` run without dropout, so a deterministic copy can share a batched MC pass.
    """

    graph_keys: Tensor
    active: Tensor | None = None

    @classmethod
    def from_generator(
        cls,
        n_graphs: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        off_fraction: float = 0.0,
    ) -> DropoutKeys:
        """Fresh independent keys (training): drawn from a seeded ``torch.Generator``.

        ``off_fraction``: each graph independently runs without dropout with this probability.
        """
        keys = torch.randint(0, 2**31 - 1, (n_graphs,), generator=generator, dtype=torch.long)
        active = None
        if off_fraction > 0:
            active = (torch.rand(n_graphs, generator=generator) >= off_fraction).to(device)
        return cls(keys.to(device), active)

    @classmethod
    def for_samples(
        cls, seed: int, n_samples: int, n_graphs: int, device: torch.device | str = "cpu"
    ) -> DropoutKeys:
        """Keys for ``n_samples`` MC copies of a batch of ``n_graphs``, copy-major order.

        The key of copy t is hash(seed, t), the same for every graph: a structure's masks depend
        only on the seed, the sample index and its own atoms, never on its batch neighbours.
        """
        base = _mix32(torch.tensor(seed & _MASK32, dtype=torch.long))
        t = torch.arange(n_samples, dtype=torch.long)
        sample_keys = hash_combine(base, t + 1)
        return cls(sample_keys.repeat_interleave(n_graphs).to(device))


def node_dropout(
    x: Tensor, rate: float, keys: DropoutKeys | None, batch: Tensor, local_atom: Tensor, site: int
) -> Tensor:
    """Elementwise dropout on hidden node features ``x`` (n, F); identity when off."""
    if keys is None or rate <= 0.0:
        return x
    h = keys.graph_keys[batch].unsqueeze(1)  # (n, 1)
    h = hash_combine(h, site)
    h = hash_combine(h, local_atom.unsqueeze(1))
    channels = torch.arange(x.shape[1], device=x.device, dtype=torch.long).unsqueeze(0)
    u = uniform_from_hash(hash_combine(h, channels), x.dtype)  # (n, F)
    weight = (u >= rate).to(x.dtype) * (1.0 / (1.0 - rate))
    if keys.active is not None:
        weight = torch.where(keys.active[batch].unsqueeze(1), weight, torch.ones_like(weight))
    return x * weight


def edge_pair_hash(
    keys: DropoutKeys,
    edge_index: Tensor,
    batch: Tensor,
    local_atom: Tensor,
    cell_shift: Tensor,
    site: int,
) -> Tensor:
    """Hash of each edge's unordered pair: equal for (j -> i, S) and (i -> j, -S). Shape (E,)."""
    src, dst = edge_index[0], edge_index[1]
    a, b = local_atom[src], local_atom[dst]
    shift = torch.round(cell_shift).to(torch.long)
    # Orient every pair the same way: smaller local index first; for self-images (a == b)
    # the shift whose first non-zero component is positive.
    first_nonzero = torch.gather(
        shift, 1, (shift != 0).to(torch.long).argmax(dim=1, keepdim=True)
    ).squeeze(1)
    flip = (a > b) | ((a == b) & (first_nonzero < 0))
    lo = torch.where(flip, b, a)
    hi = torch.where(flip, a, b)
    shift = torch.where(flip.unsqueeze(1), -shift, shift) + _SHIFT_OFFSET
    h = hash_combine(keys.graph_keys[batch[dst]], site)
    for counter in (lo, hi, shift[:, 0], shift[:, 1], shift[:, 2]):
        h = hash_combine(h, counter)
    return h


def edge_weights(
    rate: float,
    keys: DropoutKeys | None,
    edge_index: Tensor,
    batch: Tensor,
    local_atom: Tensor,
    cell_shift: Tensor,
    site: int,
    dtype: torch.dtype,
) -> Tensor | None:
    """DropEdge weights (E,): 0 for dropped pairs, 1/(1-rate) for kept; None when off."""
    if keys is None or rate <= 0.0:
        return None
    h = edge_pair_hash(keys, edge_index, batch, local_atom, cell_shift, site)
    weight = (uniform_from_hash(h, dtype) >= rate).to(dtype) * (1.0 / (1.0 - rate))
    if keys.active is not None:
        weight = torch.where(keys.active[batch[edge_index[1]]], weight, torch.ones_like(weight))
    return weight
