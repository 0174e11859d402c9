"""Node-feature dropout and DropEdge: explicit switch, seeded masks, rates, pair symmetry."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk, make_supercell, molecule

from mlforce.graph import atoms_to_graph, batch_graphs
from mlforce.nn.dropout import DropoutKeys, edge_pair_hash, edge_weights, node_dropout
from mlforce.nn.painn import PaiNNMessage, _Context
from tests.conftest import make_model


def _graph(atoms, model):
    return batch_graphs([atoms_to_graph(atoms, model.species, model.cutoff, torch.float64)])


def test_switch_off_is_deterministic_even_in_training_mode(ethanol):
    model = make_model(node=0.3, edge=0.3, readout=0.3)
    model.train()  # must not switch dropout on by itself
    g = _graph(ethanol, model)
    with torch.no_grad():
        assert torch.equal(model(g), model(g))
        model.eval()
        assert torch.equal(model(g), model(g))


def test_same_seed_same_masks_different_seed_different(ethanol):
    model = make_model(node=0.2, edge=0.2)
    g = _graph(ethanol, model)
    with torch.no_grad():
        e_off = model(g)
        a = model(g, dropout=DropoutKeys(torch.tensor([7])))
        b = model(g, dropout=DropoutKeys(torch.tensor([7])))
        c = model(g, dropout=DropoutKeys(torch.tensor([8])))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, e_off)
    gen1, gen2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    k1 = DropoutKeys.from_generator(4, gen1).graph_keys
    k2 = DropoutKeys.from_generator(4, gen2).graph_keys
    assert torch.equal(k1, k2) and len(set(k1.tolist())) == 4


def test_node_drop_fraction_matches_rate():
    n, f, rate = 4000, 64, 0.1
    x = torch.ones(n, f, dtype=torch.float64)
    batch = torch.arange(n) // 100  # 40 graphs of 100 atoms
    local = torch.arange(n) % 100
    keys = DropoutKeys(torch.arange(40) * 7919 + 11)
    y = node_dropout(x, rate, keys, batch, local, site=3)
    dropped = float((y == 0).double().mean())
    sigma = np.sqrt(rate * (1 - rate) / (n * f))
    assert abs(dropped - rate) < 5 * sigma
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - rate)))


def _copper_graph(model):
    atoms = make_supercell(bulk("Cu", "fcc", a=3.6), np.diag([2, 2, 2]))
    atoms.rattle(0.05, seed=0)
    return _graph(atoms, model)


def test_dropedge_rate_and_both_directions_together():
    model = make_model(cutoff=4.5)
    rate = 0.3
    for g in (_graph(molecule("C6H6"), model), _copper_graph(model)):
        keys = DropoutKeys(torch.tensor([424242]))
        w = edge_weights(rate, keys, g.edge_index, g.batch, g.local_atom, g.cell_shift, 5,
                         torch.float64)  # fmt: skip
        src, dst = g.edge_index
        shift = g.cell_shift.round().long()
        # the reverse of edge (j -> i, S) is (i -> j, -S)
        lookup = {
            (int(s), int(d), *map(int, sh)): e for e, (s, d, sh) in enumerate(zip(src, dst, shift))
        }
        reverse = torch.tensor(
            [lookup[(int(d), int(s), *map(int, -sh))] for s, d, sh in zip(src, dst, shift)]
        )
        assert torch.equal(w, w[reverse])
        h = edge_pair_hash(keys, g.edge_index, g.batch, g.local_atom, g.cell_shift, 5)
        assert torch.equal(h, h[reverse])
    # statistics over many pairs: fraction of dropped pairs matches the rate
    g = _copper_graph(model)
    fractions = []
    for key in range(40):
        w = edge_weights(rate, DropoutKeys(torch.tensor([key])), g.edge_index, g.batch,
                         g.local_atom, g.cell_shift, 5, torch.float64)  # fmt: skip
        fractions.append(float((w == 0).double().mean()))
    n_pairs = 40 * g.edge_index.shape[1] / 2
    sigma = np.sqrt(rate * (1 - rate) / n_pairs)
    assert abs(np.mean(fractions) - rate) < 5 * sigma


def test_dropped_edge_contributes_nothing(ethanol):
    torch.manual_seed(0)
    model = make_model(features=8, edge=0.4)
    g = _graph(ethanol, model)
    msg = PaiNNMessage(8, 8).double()
    n = g.pos.shape[0]
    s = torch.randn(n, 8, dtype=torch.float64)
    v = torch.randn(n, 3, 8, dtype=torch.float64)
    vec = g.pos[g.edge_index[0]] - g.pos[g.edge_index[1]]
    dist = vec.norm(dim=1)
    basis, env, unit = model.basis(dist), model.envelope(dist), vec / dist[:, None]
    keys = DropoutKeys(torch.tensor([99]))
    w = edge_weights(0.4, keys, g.edge_index, g.batch, g.local_atom, g.cell_shift, 5,
                     torch.float64)  # fmt: skip
    assert (w == 0).any() and (w > 0).any()
    ctx = _Context(None, g.batch, g.local_atom)
    full = msg(s, v, g.edge_index, basis, env, unit, w, ctx, 0.0, 0)
    keep = w > 0
    sub = msg(s, v, g.edge_index[:, keep], basis[keep], env[keep], unit[keep], w[keep], ctx,
              0.0, 0)  # fmt: skip
    assert torch.allclose(full[0], sub[0], atol=1e-12)
    assert torch.allclose(full[1], sub[1], atol=1e-12)


def test_masks_do_not_leak_across_graphs(ethanol):
    model = make_model(node=0.2, edge=0.2, readout=0.1)
    other = molecule("H2O")
    third = ethanol.copy()
    third.rattle(0.1, seed=1)
    with torch.no_grad():
        alone = model(_graph(ethanol, model), dropout=DropoutKeys(torch.tensor([31])))
        g2 = batch_graphs([atoms_to_graph(a, model.species, model.cutoff, torch.float64)
                           for a in (other, ethanol, third)])  # fmt: skip
        together = model(g2, dropout=DropoutKeys(torch.tensor([5, 31, 77])))
    assert torch.allclose(together[1], alone[0], atol=1e-12, rtol=0)


def test_mc_dropout_blocks_moves_dropout_at_inference_only(ethanol):
    """``mc_dropout_blocks``: training keeps every block stochastic, MC uses the last N."""
    from mlforce.model import ForceField

    torch.manual_seed(0)
    base = make_model(node=0.2, edge=0.2, blocks=3)
    variants = {}
    for n in (None, 1, 0):
        cfg = base.config.model_copy(update={"mc_dropout_blocks": n})
        m = ForceField(base.species, cfg).double()
        m.load_state_dict(base.state_dict())
        variants[n] = m.eval()
    g = _graph(ethanol, base)
    keys = DropoutKeys(torch.tensor([5]))
    with torch.no_grad():
        e = {n: m(g, dropout=keys) for n, m in variants.items()}
        e_det = base(g)
        variants[0].train()
        e_train0 = variants[0](g, dropout=keys)
        variants[0].eval()
    assert torch.equal(e[0], e_det)  # no MC block: the deterministic model
    assert not variants[0].has_dropout and variants[1].has_dropout
    assert torch.equal(e_train0, e[None])  # train mode: every block, as trained
    assert not torch.equal(e[1], e[None]) and not torch.equal(e[1], e_det)


def test_mask_cache_reuses_masks_only_while_atoms_and_pairs_are_the_same(ethanol):
    """Repeated MC calls on one walker reuse the stored masks; other atoms or pairs do not."""
    import mlforce.nn.dropout as dropout_module
    from mlforce.uncertainty import MASK_CACHE, mc_predict

    model = make_model(node=0.2, edge=0.2)
    hashed = []
    real = dropout_module._node_weight
    stretched = ethanol.copy()
    stretched.positions[0] += [2.5, 0.0, 0.0]  # an H atom moves away: other pairs, same atoms
    water = molecule("H2O")

    def run(atoms, cached):
        MASK_CACHE.clear()
        MASK_CACHE.max_elements = 2_000_000 if cached else 0
        return mc_predict(model, _graph(atoms, model), 8, seed=4).forces_samples

    try:
        dropout_module._node_weight = lambda *a: hashed.append(1) or real(*a)
        reference = {id(a): run(a, cached=False) for a in (ethanol, stretched, water)}
        MASK_CACHE.clear()
        MASK_CACHE.max_elements = 2_000_000
        hashed.clear()
        for atoms in (ethanol, ethanol, stretched, water, ethanol):
            out = mc_predict(model, _graph(atoms, model), 8, seed=4).forces_samples
            assert torch.equal(out, reference[id(atoms)])  # stored masks give the same samples
        # node masks: hashed for ethanol, kept for the stretched ethanol (same atoms), hashed
        # again for water and for ethanol after it (one entry per seed, T and pass)
        sites = len(hashed) // 3
        assert sites > 0 and len(hashed) == 3 * sites
    finally:
        dropout_module._node_weight = real
        MASK_CACHE.max_elements = 2_000_000
        MASK_CACHE.clear()
    assert not torch.equal(reference[id(ethanol)], reference[id(stretched)])


def test_last_block_rates_override_the_shared_rates(ethanol):
    """``last_node_dropout`` / ``last_edge_dropout``: rates of the last block only; with shared
    rates 0 the model samples exactly as one with dropout in the last block alone."""
    from mlforce.model import ForceField

    torch.manual_seed(0)
    last_only = make_model(node=0.2, edge=0.1, blocks=3)
    last_only = ForceField(
        last_only.species, last_only.config.model_copy(update={"dropout_blocks": 1})
    ).double()
    cfg = last_only.config.model_copy(
        update={"dropout_blocks": None, "node_dropout": 0.0, "edge_dropout": 0.0,
                "last_node_dropout": 0.2, "last_edge_dropout": 0.1}
    )  # fmt: skip
    override = ForceField(last_only.species, cfg).double()
    override.load_state_dict(last_only.state_dict())
    hybrid = ForceField(
        last_only.species, cfg.model_copy(update={"node_dropout": 0.05, "edge_dropout": 0.05})
    ).double()
    hybrid.load_state_dict(last_only.state_dict())
    g = _graph(ethanol, last_only)
    keys = DropoutKeys(torch.tensor([11]))
    with torch.no_grad():
        a, b, c = (m(g, dropout=keys) for m in (last_only, override, hybrid))
    assert override.has_dropout and override.block_rates(0) == (0.0, 0.0)
    assert override.block_rates(2) == (0.2, 0.1) and hybrid.block_rates(1) == (0.05, 0.05)
    assert torch.equal(a, b)  # same masks, same blocks
    assert not torch.equal(a, c)  # the hybrid's early blocks are stochastic too
