"""Which batch rule picks labels that teach most, with everything else held fixed.

For finished (or running) campaigns: take round r's candidates and model, choose a batch of the
same size by each rule, label it with the reference, train round r + 1's model exactly as the
campaign would (the labels before round r plus the batch, warm start from round r's model,
``active_learning.round_epochs``), and score it on the test sets. Rule ``shipped`` repeats the
campaign's own choice (``selected.extxyz``), so its row measures the replay's own noise
against the campaign's recorded next-round error.

Rules:

* ``shipped``: the campaign's own batch (per-walker k-means in the learned features, the most
  uncertain typical frame of each cluster).
* ``coverage``: greedy per-atom coverage. Each candidate's score is its largest calibrated
  per-atom σ = c_z · sqrt(σ_MC,i · d_i), d_i the latent distance of atom i to the training
  atoms; after each pick the picked frame's atoms join the training atoms, so every d_i (and
  with it the score of frames like the pick) falls. The per-walker shares are kept.
* ``coverage_density``: the same, each score times the candidate's density among the walker's
  candidates (mean Gaussian similarity of pooled descriptors, bandwidth the median distance),
  so typical frames win over outliers of equal σ.
* ``kmeans_typical``: the shipped rule recomputed from the candidates (checks the harness: it
  reproduces ``shipped``); ``kmeans_central``: the same clusters, the frame nearest each
  centroid (σ ignored within the pool); ``kmeans_maxsigma``: the most uncertain frame of each
  cluster; ``kmeans_pooled``: the shipped rule without per-walker shares;
  ``flagged_random``: uniform over all the round's flagged frames.

The pool is the round's candidates less the labels of *earlier* rounds, so every rule can
choose the frames the campaign itself chose.

    python benchmarks/replay_selection.py runs/bench/le/base_s0 --round 2 \\
        --rule shipped --rule coverage --test 300K=datasets/ethanol_test_300K.extxyz

Prints JSON: per run, round and rule, the labels and the test force MAE (eV/Å).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from mlforce.campaign import (
    RunDir,
    _new_frames,
    learned_descriptors,
    round_config,
    test_errors,
)
from mlforce.checkpoint import load_checkpoint, save_checkpoint
from mlforce.cli import _parse_overrides
from mlforce.store import LabelStore, split_frames, structure_hash

RULES = ["shipped", "coverage", "coverage_density", "kmeans_pooled", "kmeans_central",
         "kmeans_typical", "kmeans_maxsigma", "flagged_random"]  # fmt: skip


def per_atom_terms(ckpt, frames, samples: int, seed: int):
    """Per candidate: calibrated combined per-atom σ (n,), latent distance d (n,), standardised
    features (n, F) and atomic numbers (n,)."""
    from mlforce.data import graphs_from_frames
    from mlforce.latent import atom_features
    from mlforce.uncertainty import predict_dataset

    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, False)
    pred = predict_dataset(ckpt.models, graphs, samples, seed, latent=ckpt.latent)
    sigma = pred.forces_std(ckpt.calibration)
    out = []
    for s, f, g in zip(sigma, atom_features(ckpt.model, graphs), graphs):
        z = g.numbers.numpy()
        d = ckpt.latent.distance(f, z)
        x = (f - ckpt.latent.mean) / ckpt.latent.std
        out.append((s, d, x, z))
    return out


def shares(groups: np.ndarray, budget: int) -> dict[int, int]:
    """The even per-walker shares of :func:`mlforce.selection.stratified_selection`."""
    names = sorted(set(groups.tolist()))
    sizes = {g: int((groups == g).sum()) for g in names}
    share = {g: 0 for g in names}
    left = min(budget, len(groups))
    while left > 0:
        open_ = [g for g in names if share[g] < sizes[g]]
        g = min(open_, key=lambda k: (share[k], names.index(k)))
        share[g] += 1
        left -= 1
    return share


def coverage_selection(terms, groups, budget, weight=None) -> list[int]:
    """Greedy per-atom coverage (module docstring); ``weight`` (N,) multiplies the scores."""
    groups = np.asarray(groups)
    share = shares(groups, budget)
    sigma = [t[0] for t in terms]
    d0 = [np.maximum(t[1], 1e-12) for t in terms]
    d = [t[1].copy() for t in terms]
    weight = np.ones(len(terms)) if weight is None else np.asarray(weight)
    chosen: list[int] = []
    used = {g: 0 for g in share}
    while len(chosen) < sum(share.values()):
        open_ = [g for g in share if used[g] < share[g]]
        g = min(open_, key=lambda k: (used[k] / share[k], k))
        best, best_score = -1, -np.inf
        for k in np.flatnonzero(groups == g):
            if k in chosen:
                continue
            score = weight[k] * float((sigma[k] * np.sqrt(d[k] / d0[k])).max())
            if score > best_score:
                best, best_score = int(k), score
        chosen.append(best)
        used[g] += 1
        _, _, xp, zp = terms[best]
        for k, (_, _, x, z) in enumerate(terms):
            for element in np.unique(z):
                mask, pick = z == element, xp[zp == element]
                if len(pick):
                    dist = np.linalg.norm(x[mask][:, None, :] - pick[None, :, :], axis=-1)
                    d[k][mask] = np.minimum(d[k][mask], dist.min(1))
    return chosen


def density(descriptors: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean Gaussian similarity of each candidate to the others of its walker (standardised
    pooled descriptors, bandwidth the median pairwise distance)."""
    out = np.ones(len(groups))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if len(idx) < 3:
            continue
        x = descriptors[idx]
        x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        h = np.median(dist[np.triu_indices(len(idx), 1)])
        sim = np.exp(-(dist**2) / (2 * h**2))
        out[idx] = (sim.sum(1) - 1) / (len(idx) - 1)
    return out


def kmeans_rule(rule, run, round_, others, groups, wanted, config) -> list[int]:
    """Variants of the shipped per-walker k-means rule (module docstring)."""
    from scipy.cluster.vq import kmeans2

    from mlforce.selection import random_selection, stratified_selection

    seed = config.md.seed + 7919 * round_
    sigma = np.array([float(f.info.get("max_force_std", 0.0)) for f in others])
    if rule == "flagged_random":
        return random_selection(len(others), wanted, seed)
    x_all = learned_descriptors(run.checkpoint(round_), others)
    if rule == "kmeans_typical":  # the shipped rule recomputed: checks the harness
        return stratified_selection(x_all, sigma, groups, wanted, seed)
    if rule == "kmeans_pooled":
        return stratified_selection(x_all, sigma, np.zeros(len(others), int), wanted, seed)
    share = shares(groups, wanted)
    chosen: list[int] = []
    for k, g in enumerate(sorted(share)):
        members = np.flatnonzero(groups == g)
        if share[g] >= len(members):
            chosen += members.tolist()
            continue
        x = x_all[members]
        x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
        centroids, label = kmeans2(x, share[g], minit="++", seed=np.random.default_rng(seed + k))
        for c in np.unique(label):
            m = np.flatnonzero(label == c)
            dist = np.linalg.norm(x[m] - centroids[c], axis=1)
            if rule == "kmeans_central":
                pick = m[np.argmin(dist)]
            elif rule == "kmeans_maxsigma":
                pick = m[np.argmax(sigma[members][m])]
            else:
                raise ValueError(rule)
            chosen.append(int(members[pick]))
    return chosen


def label_frames(frames, reference) -> list:
    from mlforce.labeling import RetryingReference

    out = []
    calc = RetryingReference(reference)
    for frame in frames:
        atoms = frame.copy()
        atoms.info = {k: v for k, v in frame.info.items() if k in ("walker", "trigger")}
        atoms.calc = calc
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        atoms.info["structure_hash"] = structure_hash(atoms)
        out.append(atoms)
    return out


def replay(
    run_dir: Path,
    round_: int,
    rule: str,
    tests: dict,
    work: Path,
    overrides: dict | None = None,
    tag: str = "",
) -> dict:
    from mlforce.config import apply_overrides, config_from_dict
    from mlforce.train import train_models

    run = RunDir(run_dir)
    config = run.config()
    if overrides:  # the learner only: selection reads the campaign's own model and σ
        config = config_from_dict(apply_overrides(config.model_dump(), overrides), "replay")
    store = LabelStore(run.ledger)
    before = store.atoms(status="ok", selection=f"iteration<{round_}")
    own = store.atoms(status="ok", iteration=round_)
    start = time.perf_counter()
    if rule == "shipped":
        batch = own
    else:
        rdir = run.round_dir(round_)
        files = sorted(str(p) for p in rdir.glob("candidates_*.extxyz"))
        # the labels of earlier rounds only: the campaign's own picks stay in the pool
        earlier = {r["structure_hash"] for r in store.rows(selection=f"iteration<{round_}")}
        pool = _new_frames(files, earlier, set())
        selected = read(rdir / "selected.extxyz", ":")
        audits = [f for f in selected if f.info.get("trigger") == "audit"]
        audit_hashes = {structure_hash(a) for a in audits}
        others = [f for f in pool if f.info.get("trigger") != "audit"
                  and structure_hash(f) not in audit_hashes]  # fmt: skip
        wanted = len(own) - len(audits)
        ckpt = load_checkpoint(run.checkpoint(round_))
        groups = np.array([int(f.info.get("walker", 0)) for f in others])
        terms = None
        if rule.startswith("coverage"):
            terms = per_atom_terms(
                ckpt, others, config.uncertainty.mc_samples, config.uncertainty.seed
            )
        weight = None
        if rule == "coverage_density":
            weight = density(learned_descriptors(run.checkpoint(round_), others), groups)
        chosen = coverage_selection(terms, groups, wanted, weight) if terms is not None else None
        if rule.startswith("kmeans") or rule == "flagged_random":
            chosen = kmeans_rule(rule, run, round_, others, groups, wanted, config)
        batch = [*label_frames(audits, config.reference),
                 *label_frames([others[i] for i in chosen], config.reference)]  # fmt: skip
    frames = sorted([*before, *batch], key=lambda a: a.info["structure_hash"])
    train, val = split_frames(frames, config.active_learning.val_fraction)
    if not val:
        val, train = train[-1:], train[:-1]
    warm = load_checkpoint(run.checkpoint(round_)).models
    cfg = round_config(config, True)
    if cfg.training.threads is None:
        cfg.training.threads = 1
    result = train_models(train, val, cfg, warm_start=warm, log=lambda m: None)
    path = save_checkpoint(work / f"{run_dir.name}_r{round_}_{rule}{tag}", result.models)
    scores = test_errors(str(path), list(tests.values()))
    state = run.state()
    recorded = next((r for r in state.get("rounds", []) if r["round"] == round_ + 1), None)
    return {
        "run": run_dir.name,
        "round": round_,
        "rule": rule,
        "labels": len(frames),
        "batch": len(batch),
        "force_mae": {name: scores[Path(f).stem] for name, f in tests.items()},
        "recorded_next_round": (recorded or {}).get("test_force_mae"),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--round", type=int, action="append", required=True)
    parser.add_argument("--rule", action="append", required=True, choices=RULES)
    parser.add_argument("--test", action="append", required=True, metavar="NAME=FILE")
    parser.add_argument("--work", default="runs/bench/replay_selection")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="learner override")
    parser.add_argument("--tag", default="", help="suffix of the replayed checkpoints' names")
    args = parser.parse_args()
    overrides = _parse_overrides(args.set or [])
    tests = dict(t.split("=", 1) for t in args.test)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for run_dir in args.runs:
        for round_ in args.round:
            for rule in args.rule:
                item = replay(Path(run_dir), round_, rule, tests, work, overrides, args.tag)
                item["overrides"] = args.set or []
                print(json.dumps(item), file=sys.stderr, flush=True)
                out.append(item)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
