"""``mlforce report``: one self-contained HTML file about a campaign (plots embedded as PNG).

Answers, for someone who reads only the report: how many reference calls were made and why,
was the uncertainty informative (Spearman, AUROC of σ against the true error), did the
campaign converge, and how good is the final model (calibration, per-element error).
"""

from __future__ import annotations

import html
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from mlforce.metrics import auroc_top_fraction, coverage_curve, spearman
from mlforce.report import (
    plot_learning_curve,
    plot_uncertainty_vs_error,
    png_base64,
    resolve_ledger,
)

TRIGGER_COLORS = {"seed": "#999999", "uncertainty": "#1f77b4", "audit": "#2ca02c",
                  "guard": "#d62728", "manual": "#9467bd", "top_up": "#ff7f0e",
                  "random": "#8c564b"}  # fmt: skip


def _img(fig: Any, alt: str) -> str:
    src = f"data:image/png;base64,{png_base64(fig)}"
    caption = html.escape(alt)
    return f'<figure><img alt="{caption}" src="{src}"><figcaption>{caption}</figcaption></figure>'


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape("" if v is None else str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _labels_per_round(rows: list[dict[str, Any]]) -> Any:
    counts: dict[int, Counter] = {}
    for r in rows:
        counts.setdefault(int(r.get("iteration", 0)), Counter())[r.get("trigger", "?")] += 1
    rounds = sorted(counts)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bottom = np.zeros(len(rounds))
    for trig, color in TRIGGER_COLORS.items():
        vals = np.array([counts[r].get(trig, 0) for r in rounds], dtype=float)
        if vals.any():
            ax.bar([str(r) for r in rounds], vals, bottom=bottom, color=color, label=trig)
            bottom += vals
    ax.set_xlabel("round (0 = seed)")
    ax.set_ylabel("reference labels")
    ax.set_title("labels per round, by trigger")
    ax.legend(fontsize=8)
    return fig


def _trigger_rate(rounds: list[dict[str, Any]], target: float | None) -> Any:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([r["round"] for r in rounds], [r["triggers_per_ps"] for r in rounds], "o-")
    if target is not None:
        ax.axhline(target, color="crimson", ls="--", lw=1, label=f"target {target}/ps")
        ax.legend(fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("uncertainty triggers per ps")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_title("trigger rate per round")
    return fig


def _sigma_traces(run_dir: Path, rounds: list[dict[str, Any]], lower: float | None) -> Any:
    from ase.io import read

    shown = [r["round"] for r in rounds][-3:]
    fig, axes = plt.subplots(len(shown), 1, figsize=(7.5, 2.3 * len(shown)), squeeze=False)
    for ax, rnd in zip(axes[:, 0], shown):
        for path in sorted((run_dir / f"round_{rnd:03d}").glob("walker_*.extxyz")):
            frames = [
                f for f in read(path, ":") if np.isfinite(f.info.get("max_force_std", np.nan))
            ]
            if not frames:
                continue
            t = [f.info["time_fs"] / 1000 for f in frames]
            s = [f.info["max_force_std"] for f in frames]
            line = ax.plot(t, s, lw=0.8, label=path.stem)[0]
            events = [(ti, si) for ti, si, f in zip(t, s, frames)
                      if f.info.get("decision") in ("candidate", "label", "rollback")]  # fmt: skip
            if events:
                ax.plot(*zip(*events), "x", color=line.get_color(), ms=5)
        if lower is not None:
            ax.axhline(lower, color="orange", lw=1, ls="--")
        ax.set_ylabel("σ (eV/Å)")
        ax.set_title(f"round {rnd}: max_force_std along each walker (x: label requests)",
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("simulated time (ps)")
    fig.tight_layout()
    return fig


def _final_model_section(run_dir: Path, checkpoint: str | None, ledger: Path) -> str:
    """Calibration curve, per-element error and most uncertain atoms of the final model."""
    import torch

    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.store import LabelStore
    from mlforce.uncertainty import calibration_factors, predict_dataset

    if not checkpoint or not Path(checkpoint).is_file():
        return "<p>No final model to evaluate.</p>"
    config = None
    if (run_dir / "config.yaml").is_file():
        from mlforce.campaign import RunDir

        config = RunDir(run_dir).config()
    ckpt = load_checkpoint(checkpoint)
    store = LabelStore(ledger)
    _, val = store.split(config.active_learning.val_fraction if config else 0.1)
    if not val:
        return "<p>No validation labels to evaluate the final model on.</p>"
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(val, ckpt.species, ckpt.cutoff, dtype, with_labels=True)
    t = config.uncertainty.mc_samples if config else 16
    pred = predict_dataset(
        ckpt.models, graphs, t, 0, local_radius=ckpt.local_radius, latent=ckpt.latent
    )
    ref = [g.forces_ref.double().numpy() for g in graphs]
    errors = np.concatenate([f - r for f, r in zip(pred.forces, ref)])
    factors = np.concatenate(
        [calibration_factors(ckpt.calibration, torch.as_tensor(z)).numpy() for z in pred.numbers]
    )
    std = np.concatenate(pred.forces_std_xyz) * factors[:, None]
    levels, observed = coverage_curve(errors, std)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="ideal")
    ax.plot(levels, observed, "o-", label="final model (calibrated)")
    ax.set_xlabel("nominal coverage of Gaussian interval")
    ax.set_ylabel("observed fraction of force components")
    ax.set_title(f"calibration on {len(graphs)} validation labels")
    ax.legend(fontsize=8)
    calib = _img(fig, "calibration curve of the final model")
    by_molecule: dict[str, list[tuple[float, float]]] = {}
    for atoms, f, r, s in zip(val, pred.forces, ref, pred.max_force_std(ckpt.calibration)):
        by_molecule.setdefault(atoms.get_chemical_formula(), []).append(
            (float(np.abs(f - r).mean()), float(s))
        )
    table = [
        {"molecule": k, "validation frames": len(v), "force MAE (eV/Å)": np.mean([e for e, _ in v]),
         "mean max_force_std (eV/Å)": np.mean([s for _, s in v])}
        for k, v in sorted(by_molecule.items())
    ]  # fmt: skip
    calib = (
        "<p>Per molecule, on the ledger's validation labels:</p>"
        + _table(table, list(table[0]))
        + calib
    )
    numbers = np.concatenate(pred.numbers)
    from ase.data import chemical_symbols

    elems = sorted(set(numbers.tolist()))
    mae = [float(np.abs(errors[numbers == z]).mean()) for z in elems]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.bar([chemical_symbols[z] for z in elems], mae, color="#1f77b4")
    ax.set_ylabel("force MAE (eV/Å)")
    ax.set_title("final model: force error per element")
    per_element = _img(fig, "per-element force error of the final model")
    return calib + per_element


def molecules(atoms: Any) -> np.ndarray:
    """Molecule index of each atom (n,): connected components of the covalent bonds of
    :func:`mlforce.selection.bond_pairs` (periodic images included)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from mlforce.selection import bond_pairs

    n = len(atoms)
    codes = bond_pairs(atoms)
    bonds = coo_matrix((np.ones(len(codes)), (codes // n, codes % n)), shape=(n, n))
    return connected_components(bonds, directed=False)[1]


def _uncertain_atoms(run_dir: Path, ledger: Path, top: int = 8) -> str:
    """For the top-σ labelled frames: the atom the model was least sure about, its error, and
    the molecule it belongs to (in a liquid: which molecule to look at)."""
    from ase.data import chemical_symbols

    from mlforce.calculators.ml import MLForceCalculator
    from mlforce.store import LabelStore

    store = LabelStore(ledger)
    frames = [a for a in store.atoms(status="ok") if "max_force_std" in a.info]
    frames.sort(key=lambda a: -a.info["max_force_std"])
    rows = []
    for atoms in frames[:top]:
        ckpt = run_dir / f"round_{int(atoms.info.get('iteration', 0)):03d}" / "model.pt"
        if not ckpt.is_file():
            continue
        ref = atoms.get_forces()
        res = MLForceCalculator(ckpt, device="cpu").predict([atoms])[0]
        k = int(np.argmax(res["forces_std"]))
        label = molecules(atoms)
        members = np.flatnonzero(label == label[k])
        rows.append({
            "label id": atoms.info["id"], "round": atoms.info.get("iteration"),
            "trigger": atoms.info.get("trigger"), "max_force_std": atoms.info["max_force_std"],
            "atom index": k, "element": chemical_symbols[int(atoms.numbers[k])],
            "atom σ": float(res["forces_std"][k]),
            "atom true error": float(np.linalg.norm(res["forces"][k] - ref[k])),
            "molecule": f"{atoms[members].get_chemical_formula()} #{label[k]}",
            "molecule atoms": " ".join(str(i) for i in members),
            "molecule σ (mean)": float(np.mean(res["forces_std"][members])),
        })  # fmt: skip
    if not rows:
        return "<p>No labelled frames with an uncertainty yet.</p>"
    return _table(rows, list(rows[0]))


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.8em;margin:.5em 0;display:block;overflow-x:auto}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f3f3f3}figure{display:inline-block;margin:.5em}
figcaption{font-size:.8em;color:#555;text-align:center}img{max-width:100%}
.kpi{display:inline-block;border:1px solid #ccc;border-radius:6px;padding:.5em 1em;margin:.3em}
.kpi b{display:block;font-size:1.4em}"""


def build_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of a run directory (or a bare ledger); return its path."""
    from mlforce.store import LabelStore

    ledger, run_dir = resolve_ledger(path)
    out = Path(out) if out else (run_dir or ledger.parent) / "report.html"
    store = LabelStore(ledger)
    rows = store.rows()
    state = json.loads((run_dir / "state.json").read_text()) if run_dir else {}
    rounds = state.get("rounds", [])
    title = f"mlforce campaign report: {run_dir or ledger}"
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>Generated {time.strftime('%Y-%m-%d %H:%M')}.</p>"]  # fmt: skip
    if not rows:
        parts.append("<p><b>Nothing to show:</b> the ledger holds no labels yet.</p>")
        return _write(out, title, parts)
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "failed"]
    by_trigger = Counter(r.get("trigger", "?") for r in rows)
    ref_seconds = sum(r.get("reference_seconds", 0.0) for r in rows)
    scored = [r for r in ok if "max_force_std" in r and "true_max_force_error" in r]
    err = np.array([r["true_max_force_error"] for r in scored])
    config = None
    if run_dir and (run_dir / "config.yaml").is_file():
        from mlforce.campaign import RunDir

        config = RunDir(run_dir).config()
    # Rank σ as the models gave it (raw, re-scored) when every label has it and its unit is
    # eV/Å: each round's calibration is one scale fitted on a few validation frames, and pooled
    # over rounds its noise, not σ's, decides much of the ranking (docs/benchmarks.md 16). A σ
    # with the latent distance (uncertainty.latent_atoms) is raw sqrt(σ_MC · d), d in each round
    # model's own feature units: only the calibrated σ (eV/Å) compares rounds (section 31).
    latent = config is not None and bool(config.uncertainty.latent_atoms) and (
        config.training.ensemble == 1)  # fmt: skip
    has_raw = bool(scored) and all("max_force_std_raw" in r for r in scored)
    raw = has_raw and not latent
    sigma = np.array([r["max_force_std_raw" if raw else "max_force_std"] for r in scored])
    other = "max_force_std" if raw else "max_force_std_raw"
    sp_other = spearman(np.array([r[other] for r in scored]), err) if has_raw else None
    sp = spearman(sigma, err) if len(scored) > 2 else float("nan")
    auc = auroc_top_fraction(sigma, err, 0.1) if len(scored) >= 10 else float("nan")
    reason = state.get("stop_reason", "not finished (or not a flow run)")
    kpis = [
        ("reference calls", f"{len(rows)}"), ("ok / failed", f"{len(ok)} / {len(failed)}"),
        ("reference time", f"{ref_seconds:.1f} s"), ("rounds", f"{len(rounds)}"),
        ("Spearman σ vs error", f"{sp:.2f}"), ("AUROC top 10%", f"{auc:.2f}"),
    ]  # fmt: skip
    parts.append("<h2>Campaign summary</h2>")
    parts.append("".join(f'<span class="kpi">{k}<b>{html.escape(v)}</b></span>' for k, v in kpis))

    triggers = ", ".join(f"{k}: {v}" for k, v in sorted(by_trigger.items()))
    parts.append(
        f"<p><b>Stop reason:</b> {html.escape(str(reason))}. <b>Labels by trigger:</b> "
        f"{triggers}.</p>"
    )
    which = "the raw MC max_force_std" if raw else "the predicted (calibrated) max_force_std"
    parts.append(
        f"<p>Was the uncertainty informative? Over {len(scored)} labelled frames with a model "
        f"prediction, the rank correlation between {which} and the true max "
        f"force error is {sp:.2f}, and σ flags the 10% worst frames with ROC-AUC {auc:.2f} "
        "(0.5 = no better than chance).</p>"
    )
    if sp_other is not None and raw:
        parts.append(
            f"<p>Calibrated (each round's own scale, fitted on its validation split), the same "
            f"σ ranks the errors with Spearman {sp_other:.2f}: pooled over rounds, the "
            "scales' noise reorders frames of different rounds.</p>"
        )
    elif sp_other is not None:
        parts.append(
            f"<p>This campaign's σ combines the MC spread with the distance to the training "
            f"atoms in each round model's own features (uncertainty.latent_atoms): raw, "
            f"sqrt(σ_MC · d), its scale is each round model's own, and pooled over rounds it "
            f"ranks the errors with Spearman {sp_other:.2f}; calibrated, every round's σ is an "
            "expected error in eV/Å, the number the triggers compare.</p>"
        )
    walker = [r for r in scored if "trigger_max_force_std" in r]
    if len(walker) > 2:
        sp_walker = spearman(
            np.array([r["trigger_max_force_std"] for r in walker]),
            np.array([r["true_max_force_error"] for r in walker]),
        )
        parts.append(
            f"<p>Each label's σ above is re-scored by its round's model with more MC samples "
            f"(uncertainty.label_samples); the walkers' own σ, which flagged and chose the "
            f"frames (fewer samples, the same masks at every check), ranks the same "
            f"{len(walker)} frames with Spearman {sp_walker:.2f}.</p>"
        )
    if rounds:
        cols = ["round", "labels_added", "labels_failed", "labels_total", "val_force_mae",
                "check_force_mae", "audit_max_force_error", "triggers_per_ps", "sigma_mean",
                "sigma_max", "train_seconds", "simulate_seconds", "label_seconds"]  # fmt: skip
        cols = [c for c in cols if c != "check_force_mae" or "check_force_mae" in rounds[-1]]
        parts.append(_table(rounds, cols))
    parts.append(_img(_labels_per_round(rows), "labels per round by trigger"))
    parts.append("<h2>Learning and uncertainty</h2>")
    if rounds:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        plot_learning_curve(ax, rounds)
        parts.append(_img(fig, "learning curve"))
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    lower = config.md.triggers.lower if config else None
    upper = config.md.triggers.upper if config else None
    plot_uncertainty_vs_error(ax, ok, lower, upper)
    parts.append(_img(fig, "uncertainty vs true error (labelled and audit frames)"))
    if rounds:
        target = config.active_learning.target_triggers_per_ps if config else None
        parts.append(_img(_trigger_rate(rounds, target), "trigger rate per ps by round"))
        parts.append(_img(_sigma_traces(run_dir, rounds, lower), "σ along the walkers"))
    parts.append("<h2>Final model</h2>")
    tests = state.get("final_test_force_mae") or {}
    if tests:
        parts.append("<p>Force MAE (eV/Å) of the final model on each test set:</p>")
        parts.append(_table([{"test set": k, "force MAE": v} for k, v in tests.items()],
                            ["test set", "force MAE"]))  # fmt: skip
    final = state.get("final_checkpoint") or (rounds[-1]["checkpoint"] if rounds else None)
    parts.append(_final_model_section(run_dir or ledger.parent, final, ledger))
    parts.append("<h3>Most uncertain atoms of the top-σ labelled frames</h3>")
    parts.append(_uncertain_atoms(run_dir or ledger.parent, ledger))
    return _write(out, title, parts)


def _write(out: Path, title: str, parts: list[str]) -> Path:
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return out
