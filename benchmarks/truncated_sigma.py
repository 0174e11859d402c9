"""Would a cheaper MC pass rank as well? σ from force deviations through the stochastic blocks only.

With dropout in the last block only, each MC copy's energy is exact from the deterministic
prefix's features, but its forces need a backward pass through every block. Dropping the
prefix path (its features detached, so only the stochastic blocks' own geometry carries
gradients) would make a copy ~3x cheaper. This script scores that truncated σ against the
exact one, per-atom max / mean / 3 Å neighbourhood, T = 16, 32, 64, mask seeds 0-2:

    python benchmarks/truncated_sigma.py CHECKPOINT 300K=datasets/ethanol_test_300K.extxyz

Prints one line per (mode, T, summary): mean Spearman, mean AUROC top 10 %, per seed.
"""

import sys
import types
from pathlib import Path

import numpy as np
import torch

from mlforce.checkpoint import load_checkpoint
from mlforce.data import graphs_from_frames, read_labelled
from mlforce.metrics import auroc_top_fraction, spearman
from mlforce.model import _batch_vector, edge_vectors
from mlforce.nn.dropout import block_site, edge_weights
from mlforce.nn.painn import _Context
from mlforce.uncertainty import predict_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sigma_aggregation import summaries

SUMMARIES = ("max", "mean", "max_local_mean_3A")


def truncated_features(self, graph, positions, cell, dropout):
    """ForceField._scalar_features with the prefix blocks on detached geometry and features."""
    pos = graph.pos if positions is None else positions
    batch = _batch_vector(graph)

    def geometry(p):
        vec = edge_vectors(graph, p, cell)
        dist = torch.linalg.norm(vec, dim=1)
        return vec / dist.unsqueeze(1), self.basis(dist), self.envelope(dist)

    live, dead = geometry(pos), geometry(pos.detach())
    s, v = self.embedding(graph.species).to(pos.dtype), None
    ctx = _Context(dropout, batch, graph.local_atom)
    first = self.first_stochastic_block
    for b, block in enumerate(self.blocks):
        stochastic = b >= first
        if b == first and v is not None:
            s, v = s.detach(), v.detach()
        unit, basis, envelope = live if stochastic else dead
        node_rate, edge_rate = self.block_rates(b) if stochastic else (0.0, 0.0)
        weight = None
        if stochastic:
            weight = edge_weights(
                edge_rate, dropout, graph.edge_index, batch, graph.local_atom,
                graph.cell_shift, block_site(b, 2), pos.dtype,
            )  # fmt: skip
        s, v = block(s, v, graph.edge_index, basis, envelope, unit, weight, ctx, node_rate)
    return s, ctx


def score(ckpt, name, path, out):
    dtype = next(ckpt.model.parameters()).dtype
    frames = read_labelled(path)
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, with_labels=True)
    f_ref = [g.forces_ref.numpy().astype(np.float64) for g in graphs]
    model = ckpt.models[0]
    det = predict_dataset(ckpt.models, graphs, 2, 0).forces  # the exact deterministic forces
    true_max = np.array([np.linalg.norm(f - r, axis=1).max() for f, r in zip(det, f_ref)])
    for mode in ("full", "truncated"):
        if mode == "truncated":
            model._scalar_features = types.MethodType(truncated_features, model)
        for t in (16, 32, 64):
            for seed in (0, 1, 2):
                pred = predict_dataset(ckpt.models, graphs, t, seed)
                for key, value in summaries(pred.forces_std(), frames, [3.0]).items():
                    if key in SUMMARIES:
                        row = out.setdefault(name, {}).setdefault(f"{mode} T{t} {key}", [])
                        rho = round(spearman(value, true_max), 3)
                        row.append((rho, round(auroc_top_fraction(value, true_max, 0.1), 3)))
        if mode == "truncated":
            del model._scalar_features
    for key, rows in out[name].items():
        rho = np.mean([a for a, _ in rows]).round(3)
        auc = np.mean([b for _, b in rows]).round(3)
        print(name, key, rho, auc, rows, flush=True)


def main() -> None:
    torch.set_num_threads(1)
    ckpt = load_checkpoint(sys.argv[1])
    out: dict = {}
    for item in sys.argv[2:]:
        name, _, path = item.partition("=")
        score(ckpt, name, path, out)


if __name__ == "__main__":
    main()
