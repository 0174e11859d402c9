"""Batch selection strategies: pure functions, and the campaign's select step on a real run."""

from __future__ import annotations

import shutil

import numpy as np
import torch
import yaml
from ase.io import read

from mlforce.campaign import RunDir, select_frames
from mlforce.graph import atoms_to_graph
from mlforce.selection import (
    cluster_selection,
    pooled_descriptor,
    random_selection,
    stratified_selection,
)
from mlforce.store import LabelStore, structure_hash
from tests.conftest import ROOT, make_model, random_rotation


def test_cluster_selection_takes_the_most_uncertain_of_each_region():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([c + rng.normal(scale=0.3, size=(20, 2)) for c in centres])
    sigma = rng.uniform(0.1, 0.2, size=60)
    sigma[:20] += 1.0  # the first region is the most uncertain everywhere
    chosen = cluster_selection(x, sigma, budget=3, seed=1)
    assert len(chosen) == 3
    assert sorted(i // 20 for i in chosen) == [0, 1, 2]  # one per region, not 3 from region 0
    for i in chosen:  # the most uncertain of the region's typical (inner-half) members
        region = np.arange(20 * (i // 20), 20 * (i // 20) + 20)
        distance = np.linalg.norm(x[region] - x[region].mean(0), axis=1)
        assert sigma[i] >= np.sort(sigma[region])[-10]
        assert distance[i % 20] <= np.percentile(distance, 75)
    assert chosen[0] // 20 == 0  # highest σ first
    assert chosen == cluster_selection(x, sigma, budget=3, seed=1)  # seeded


def test_cluster_selection_small_pool_and_zero_budget():
    x = np.arange(8.0).reshape(4, 2)
    assert cluster_selection(x, [0.1, 0.4, 0.2, 0.3], budget=10) == [1, 3, 2, 0]
    assert cluster_selection(x, [0.1, 0.4, 0.2, 0.3], budget=0) == []
    assert cluster_selection(np.zeros((0, 2)), [], budget=5) == []
    # identical candidates: still exactly `budget` distinct picks
    picks = cluster_selection(np.zeros((6, 3)), np.linspace(0, 1, 6), budget=3)
    assert len(set(picks)) == 3


def test_random_selection_is_seeded_and_without_replacement():
    a = random_selection(100, 10, seed=3)
    assert a == random_selection(100, 10, seed=3) and len(set(a)) == 10
    assert a != random_selection(100, 10, seed=4)
    assert sorted(random_selection(5, 10, seed=0)) == [0, 1, 2, 3, 4]
    assert random_selection(0, 3, seed=0) == []


def test_pooled_descriptor_is_invariant_and_per_element(ethanol):
    model = make_model()
    species = model.species
    g = atoms_to_graph(ethanol, species, model.cutoff, torch.float64)
    rotated = ethanol.copy()
    rotated.positions = ethanol.positions @ random_rotation(2).T + 1.5
    perm = np.random.default_rng(0).permutation(len(ethanol))
    shuffled = rotated[perm]
    descriptors = []
    for atoms in (ethanol, rotated, shuffled):
        graph = atoms_to_graph(atoms, species, model.cutoff, torch.float64)
        feats = model.atom_features(graph).numpy()
        descriptors.append(pooled_descriptor(feats, atoms.numbers, species))
    assert descriptors[0].shape == (len(species) * 16,)
    np.testing.assert_allclose(descriptors[1], descriptors[0], atol=1e-9)
    np.testing.assert_allclose(descriptors[2], descriptors[0], atol=1e-9)
    copper_block = descriptors[0].reshape(len(species), 16)[species.index(29)]
    assert np.all(copper_block == 0)  # no Cu in ethanol
    assert model.atom_features(g).requires_grad is False


def _with_selection(run_dir, tmp_path, selection):
    copy = tmp_path / selection
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["active_learning"]["selection"] = selection
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    # back to the moment before round 2's labels: its candidates are not labelled yet
    import ase.db

    with ase.db.connect(copy / "labels.db") as db:
        db.delete([row.id for row in db.select(iteration=2)])
    return RunDir(copy)


def test_select_step_swaps_strategy_with_one_key(tiny_campaign, tmp_path):
    run_dir, _ = tiny_campaign
    counts = {}
    for selection in ("uncertainty", "uncertainty_latent", "uncertainty_fps", "random"):
        run = _with_selection(run_dir, tmp_path, selection)
        files = sorted(str(p) for p in (run.root / "round_002").glob("candidates_*.extxyz"))
        out = select_frames(run, 2, files)
        frames = read(out["selected_file"], ":") if out["n_selected"] else []
        counts[selection] = out["n_selected"]
        known = LabelStore(run.ledger).hashes()
        hashes = [structure_hash(f) for f in frames]
        assert len(set(hashes)) == len(hashes) and not set(hashes) & set(known)
        candidates = {structure_hash(f) for p in files for f in read(p, ":")}
        visited = {
            structure_hash(f)
            for p in (run.root / "round_002").glob("walker_*.extxyz")
            for f in read(p, ":")
        }
        if selection == "random":
            picked = [f for f in frames if f.info.get("trigger") == "random"]
            assert all(structure_hash(f) in visited for f in picked)
            assert all(f.info["iteration"] == 2 and "walker" in f.info for f in picked)
        else:
            assert set(hashes) <= candidates
    # the same number of labels: only which frames differs
    assert counts["uncertainty"] == counts["random"] == counts["uncertainty_fps"] > 0
    assert counts["uncertainty_latent"] == counts["uncertainty"]


def test_latent_novelty_is_zero_for_labelled_frames_and_grows_away_from_them(tiny_campaign):
    """``selection: uncertainty_latent`` scores frames by their distance to the ledger's
    labelled atoms in the round model's features: zero for a labelled frame itself."""
    from mlforce.campaign import RunDir, latent_novelty

    run_dir, _ = tiny_campaign
    run = RunDir(run_dir)
    labelled = LabelStore(run.ledger).atoms(status="ok")
    distorted = [a.copy() for a in labelled[:3]]
    for k, a in enumerate(distorted):
        a.positions += np.random.default_rng(k).normal(scale=0.25, size=a.positions.shape)
    novelty = latent_novelty(run.checkpoint(1), labelled[:3] + distorted, labelled)
    assert np.allclose(novelty[:3], 0.0, atol=1e-3)
    assert (novelty[3:] > 10 * max(novelty[:3].max(), 1e-3)).all()


def test_cluster_selection_skips_far_outliers_of_a_cluster():
    rng = np.random.default_rng(1)
    x = rng.normal(scale=0.2, size=(30, 2))
    x[7] = [3.0, 3.0]  # an outlier inside the single cluster, and the most uncertain frame
    sigma = rng.uniform(0.1, 0.2, size=30)
    sigma[7] = 5.0
    (pick,) = cluster_selection(x, sigma, budget=1)
    assert pick != 7
    typical = np.linalg.norm(x - x.mean(0), axis=1) <= np.median(np.linalg.norm(x, axis=1)) + 0.1
    assert typical[pick]


def test_stratified_selection_shares_the_budget_between_walkers():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 3))
    groups = np.array([0] * 5 + [1] * 15 + [2] * 40)
    sigma = np.where(groups == 2, 1.0, 0.1) + rng.uniform(0, 0.05, size=60)
    chosen = stratified_selection(x, sigma, groups, budget=15, seed=0)
    counts = np.bincount(groups[chosen], minlength=3)
    assert counts.tolist() == [5, 5, 5]  # not all 15 from the most uncertain walker
    chosen = stratified_selection(x, sigma, groups, budget=40, seed=0)
    assert np.bincount(groups[chosen], minlength=3).tolist() == [5, 15, 20]
    assert len(set(chosen)) == 40
    assert stratified_selection(x, sigma, groups, budget=100) == sorted(
        range(60), key=lambda i: -sigma[i]
    )


def test_bond_guard_keeps_thermal_frames_and_trips_on_a_broken_or_new_bond(xtb_frames):
    from mlforce.config import GuardConfig
    from mlforce.selection import bond_pairs, guard_violation

    start = read(ROOT / "data" / "ethanol.xyz")
    bonds = bond_pairs(start)
    assert len(bonds) == 8  # C-C, C-O, O-H, 5 C-H
    zero = np.zeros((len(start), 3))
    cfg = GuardConfig()
    # xTB MD up to 800 K stretches bonds but never past the factor: no trip
    assert all(guard_violation(a, zero, 800.0, cfg, bonds) is None for a in xtb_frames)
    o = start.get_chemical_symbols().index("O")
    h = int(np.argsort(start.get_distances(o, range(len(start))))[1])  # the hydroxyl H
    assert start.numbers[h] == 1 and start.get_distance(o, h) < 1.1
    broken = start.copy()
    broken.positions[h] += 0.8 * (start.positions[h] - start.positions[o])  # O-H ~1.75 Å
    assert guard_violation(broken, zero, 300.0, cfg, bonds) == "guard:bonds"
    migrated = start.copy()
    migrated.positions[h] = start.positions[1] + [0.0, 0.0, 1.09]  # the H now sits on C
    assert guard_violation(migrated, zero, 300.0, cfg, bonds) == "guard:bonds"
    # off for reactive chemistry and metals; without start bonds nothing is compared
    assert guard_violation(broken, zero, 300.0, GuardConfig(keep_bonds=False), bonds) is None
    assert guard_violation(broken, zero, 300.0, cfg, None) is None


def test_bond_pairs_in_a_periodic_cell_use_the_minimum_image():
    from ase.build import molecule

    from mlforce.selection import bond_pairs

    water = molecule("H2O")  # O near the origin, both H atoms below it (z < 0)
    water.cell = [6.0, 6.0, 6.0]
    water.pbc = True
    water.wrap()  # the H atoms now sit across the cell boundary, > 5 Å from O in plain distance
    assert np.array_equal(bond_pairs(water), [1, 2])  # O-H, O-H through the minimum image
    water.pbc = False
    assert len(bond_pairs(water)) == 0  # without the cell both bonds are gone


def test_select_step_records_sigma_rescored_with_more_samples(tiny_campaign, tmp_path):
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.uncertainty import predict_dataset

    run_dir, _ = tiny_campaign
    run = _with_selection(run_dir, tmp_path, "uncertainty")
    u = run.config().uncertainty
    assert u.label_samples > u.mc_samples  # the default
    files = sorted(str(p) for p in (run.root / "round_002").glob("candidates_*.extxyz"))
    walker_sigma = {structure_hash(f): f.info["max_force_std"] for p in files for f in read(p, ":")}

    cfg = yaml.safe_load((run.root / "config.yaml").read_text())  # off: the walker's σ
    cfg["uncertainty"]["label_samples"] = None
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg))
    plain = read(select_frames(run, 2, files)["selected_file"], ":")
    assert plain and all("trigger_max_force_std" not in f.info for f in plain)
    assert all(f.info["max_force_std"] == walker_sigma[structure_hash(f)] for f in plain)

    cfg["uncertainty"]["label_samples"] = u.label_samples
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg))
    frames = read(select_frames(run, 2, files)["selected_file"], ":")
    # the same frames chosen (by the walkers' σ), in the same order
    assert [structure_hash(f) for f in frames] == [structure_hash(f) for f in plain]
    ckpt = load_checkpoint(run.checkpoint(2))
    for frame in frames:  # the walker's σ kept, the recorded σ recomputed independently
        assert frame.info["trigger_max_force_std"] == walker_sigma[structure_hash(frame)]
        graphs = graphs_from_frames([frame], ckpt.species, ckpt.cutoff)
        pred = predict_dataset(
            ckpt.models, graphs, u.label_samples, seed=u.seed + 1 + 2,
            local_radius=ckpt.local_radius, latent=ckpt.latent,
        )  # fmt: skip
        assert ckpt.latent is not None  # the tiny config's σ combines with the latent distance
        expected = pred.max_force_std(ckpt.calibration)[0]
        np.testing.assert_allclose(frame.info["max_force_std"], expected, rtol=1e-4)
        np.testing.assert_allclose(frame.info["max_force_std_raw"], pred.max_force_std()[0],
                                   rtol=1e-4)  # fmt: skip
    assert any(f.info["max_force_std"] != f.info["trigger_max_force_std"] for f in frames)


def test_a_quiet_but_inaccurate_campaign_fills_its_round_from_the_visited_frames(
    tiny_campaign, tmp_path
):
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.evaluate import predict_graphs

    run_dir, _ = tiny_campaign
    run = _with_selection(run_dir, tmp_path, "uncertainty")
    files = sorted(str(p) for p in (run.root / "round_002").glob("candidates_*.extxyz"))
    flagged = {structure_hash(f) for p in files for f in read(p, ":")}
    cfg = yaml.safe_load((run.root / "config.yaml").read_text())
    cfg["active_learning"]["labels_per_round"] = len(flagged) + 6
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg))
    plain = read(select_frames(run, 2, files)["selected_file"], ":")
    assert {f.info["trigger"] for f in plain} <= {"uncertainty", "audit"}
    assert len(plain) == len(flagged)  # a round takes what was flagged, no more (check passed)

    # round 1 quiet (below an absurd rate target) but failing an absurd accuracy check
    cfg["active_learning"].update(target_triggers_per_ps=1e9, converged_rounds=1)
    cfg["active_learning"]["check"]["target_force_mae"] = 1e-6
    (run.root / "config.yaml").write_text(yaml.safe_dump(cfg))
    frames = read(select_frames(run, 2, files)["selected_file"], ":")
    extra = [f for f in frames if f.info["trigger"] == "top_up"]
    assert {structure_hash(f) for f in frames if f.info["trigger"] != "top_up"} == {
        structure_hash(f) for f in plain
    }  # the flagged frames first, all of them
    visited = {structure_hash(f) for p in (run.root / "round_002").glob("walker_*.extxyz")
               for f in read(p, ":")[1:]}  # fmt: skip
    assert 0 < len(extra) <= 6 and len(frames) <= len(flagged) + 6
    for f in extra:  # visited, new, with the round model's forces for the true error
        assert structure_hash(f) in visited and structure_hash(f) not in flagged
        assert f.info["iteration"] == 2 and "walker" in f.info and "max_force_std" in f.info
    ckpt = load_checkpoint(run.checkpoint(2))
    graphs = graphs_from_frames(extra, ckpt.species, ckpt.cutoff)
    for f, forces in zip(extra, predict_graphs(ckpt.model, graphs)[1]):
        np.testing.assert_allclose(f.arrays["model_forces"], forces, atol=1e-5)
