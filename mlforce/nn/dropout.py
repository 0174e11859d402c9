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
    ``masks``: optional store for the mask weights this forward computes, reused by a later
    forward with the same keys, atoms and edges (:class:`MaskCache` checks that they are).
    """

    graph_keys: Tensor
    active: Tensor | None = None
    masks: dict | None = None

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


class MaskCache:
    """Mask weights of repeated MC passes over the same atoms, kept between calls.

    A structure's masks depend only on the keys (seed, sample), its atoms' indices and, for
    DropEdge, its pairs: an MD walker evaluated every step with the same seed hashes the same
    masks again and again (about 30 % of a T = 16 ethanol call on CPU). :meth:`masks_for`
    returns the stored weights while the pass's atoms and pairs are unchanged (node masks
    survive a changed neighbour list; edge weights do not; both go when the atoms change).
    Entries are keyed by whatever fixes the keys (seed, T, pass), at most ``max_entries`` of
    them, least recently used dropped first; passes of more than ``max_elements`` mask
    elements are not kept.
    """

    def __init__(self, max_entries: int = 16, max_elements: int = 2_000_000) -> None:
        from collections import OrderedDict
        from threading import Lock

        self.max_entries = max_entries
        self.max_elements = max_elements
        self._entries: OrderedDict = OrderedDict()
        self._lock = Lock()

    def masks_for(
        self, key: tuple, atoms: tuple[Tensor, ...], pairs: tuple[Tensor, ...], elements: int
    ) -> dict | None:
        """The store for pass ``key`` (None when too large to keep): emptied of node masks if
        ``atoms`` changed, of edge weights if ``pairs`` changed."""
        if elements > self.max_elements:
            return None
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                entry = {"atoms": None, "pairs": None, "node": {}, "edge": {}}
            if entry["atoms"] is None or not _same(entry["atoms"], atoms):
                entry["atoms"], entry["node"], entry["pairs"] = atoms, {}, None
            if entry["pairs"] is None or not _same(entry["pairs"], pairs):
                entry["pairs"], entry["edge"] = pairs, {}
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            # This call's own view: a concurrent call that replaces the entry's stores (other
            # pairs) leaves the stores this pass reads from untouched.
            return {"node": entry["node"], "edge": entry["edge"]}

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _same(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> bool:
    return all(
        x.shape == y.shape and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b)
    )


def node_dropout(
    x: Tensor, rate: float, keys: DropoutKeys | None, batch: Tensor, local_atom: Tensor, site: int
) -> Tensor:
    """Elementwise dropout on hidden node features ``x`` (n, F); identity when off."""
    if keys is None or rate <= 0.0:
        return x
    store = keys.masks["node"] if keys.masks is not None else None
    tag = (site, rate, x.shape, x.dtype)
    if store is not None and tag in store:
        return x * store[tag]
    weight = _node_weight(x, rate, keys, batch, local_atom, site)
    if store is not None:
        store[tag] = weight
    return x * weight


def _node_weight(
    x: Tensor, rate: float, keys: DropoutKeys, batch: Tensor, local_atom: Tensor, site: int
) -> Tensor:
    h = keys.graph_keys[batch].unsqueeze(1)  # (n, 1)
    h = hash_combine(h, site)
    h = hash_combine(h, local_atom.unsqueeze(1))
    channels = torch.arange(x.shape[1], device=x.device, dtype=torch.long).unsqueeze(0)
    u = uniform_from_hash(hash_combine(h, channels), x.dtype)  # (n, F)
    weight = (u >= rate).to(x.dtype) * (1.0 / (1.0 - rate))
    if keys.active is not None:
        weight = torch.where(keys.active[batch].unsqueeze(1), weight, torch.ones_like(weight))
    return weight


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
    store = keys.masks["edge"] if keys.masks is not None else None
    tag = (site, rate, dtype)
    if store is not None and tag in store:
        return store[tag]
    h = edge_pair_hash(keys, edge_index, batch, local_atom, cell_shift, site)
    weight = (uniform_from_hash(h, dtype) >= rate).to(dtype) * (1.0 / (1.0 - rate))
    if keys.active is not None:
        weight = torch.where(keys.active[batch[edge_index[1]]], weight, torch.ones_like(weight))
    if store is not None:
        store[tag] = weight
    return weight
