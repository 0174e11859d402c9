"""How well σ ranks the labels inside each round of a campaign, by its parts.

For every round k of one or more campaign run directories, the labels taken in round k are
re-scored by that round's model (``round_k/model.pt``): the MC spread alone (σ_MC, the
checkpoint's own T and neighbourhood radius), the latent distance alone (d, the worst
``local_radius`` neighbourhood), and their combination sqrt(σ_MC · d) when the checkpoint
holds a latent reference (the campaign's σ). Each is ranked against the label's true max
force error (deterministic model against the reference, eV/Å, as the ledger stores it).

    python benchmarks/round_ranking.py runs/bench/le/base25_s0 runs/bench/le/base25_s1 > out.json

Prints JSON: per run and round (rounds of at least 5 labels), the label count, the Spearman
of each part, that of the σ the ledger stored, and the round's triggers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from mlforce.checkpoint import load_checkpoint
from mlforce.graph import atoms_to_graph
from mlforce.latent import atom_features, local_max
from mlforce.metrics import spearman
from mlforce.store import LabelStore
from mlforce.uncertainty import predict_dataset


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    return spearman(a, b) if len(a) >= 5 else None


def round_ranking(run_dir: Path, min_labels: int = 5) -> list[dict]:
    """Per round: labels, and Spearman of σ_MC, d and the combined σ with the true error."""
    store = LabelStore(run_dir / "labels.db")
    rows = [r for r in store.rows() if r.get("status") == "ok" and "true_max_force_error" in r]
    atoms_by_id = {a.info["id"]: a for a in store.atoms(status="ok")}
    out = []
    for k in sorted({r["iteration"] for r in rows if r["iteration"] >= 1}):
        ckpt_path = run_dir / f"round_{k:03d}" / "model.pt"
        labels = [r for r in rows if r["iteration"] == k]
        if not ckpt_path.is_file() or len(labels) < min_labels:
            continue
        ck = load_checkpoint(ckpt_path)
        frames = [atoms_by_id[r["id"]] for r in labels]
        graphs = [atoms_to_graph(a, ck.species, ck.cutoff) for a in frames]
        err = np.array([r["true_max_force_error"] for r in labels])
        mc = predict_dataset(ck.models, graphs, ck.mc_samples, local_radius=ck.local_radius)
        entry = {"round": k, "labels": len(labels),
                 "sigma_mc": _spearman(mc.max_force_std(), err)}  # fmt: skip
        if ck.latent is not None:
            comb = predict_dataset(ck.models, graphs, ck.mc_samples,
                                   local_radius=ck.local_radius, latent=ck.latent)  # fmt: skip
            radius = ck.local_radius or 1e-3  # None: per atom (the atom alone)
            d = np.array([
                local_max(ck.latent.distance(f, g.numbers.cpu().numpy()),
                          g.pos.detach().cpu().double().numpy(), radius)
                for g, f in zip(graphs, atom_features(ck.model, graphs))
            ])  # fmt: skip
            entry["latent_d"] = _spearman(d, err)
            entry["combined"] = _spearman(comb.max_force_std(), err)
        entry["stored_sigma"] = _spearman(np.array([r["max_force_std"] for r in labels]), err)
        entry["triggers"] = sorted({r.get("trigger", "?") for r in labels})
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    result = {str(d): round_ranking(d) for d in args.run_dirs}
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
