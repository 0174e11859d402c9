"""Plots and tables from the ledger and a run directory (shared by the report and the flow).

Every plot function draws on a matplotlib ``Axes`` and returns it; :func:`png_base64` turns a
figure into an embeddable PNG. Nothing here needs a display (Agg backend).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mlforce.metrics import spearman


def png_base64(fig: Any, dpi: int = 110) -> str:
    """The figure as a base64 PNG string (and the figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_uncertainty_vs_error(
    ax: Any, rows: Sequence[dict[str, Any]], lower: float | None = None,
    upper: float | None = None,
) -> Any:  # fmt: skip
    """Scatter of predicted ``max_force_std`` vs ``true_max_force_error`` per round/trigger."""
    pts = [r for r in rows if "max_force_std" in r and "true_max_force_error" in r]
    if not pts:
        ax.text(0.5, 0.5, "no labelled frames with a model prediction yet", ha="center",
                va="center", transform=ax.transAxes)  # fmt: skip
        return ax
    rounds = sorted({int(r.get("iteration", 0)) for r in pts})
    cmap = plt.get_cmap("viridis", max(len(rounds), 2))
    for k, rnd in enumerate(rounds):
        for trigger, marker in (("uncertainty", "o"), ("audit", "^")):
            sel = [
                r for r in pts if int(r.get("iteration", 0)) == rnd and r.get("trigger") == trigger
            ]
            if sel:
                ax.scatter(
                    [r["max_force_std"] for r in sel], [r["true_max_force_error"] for r in sel],
                    s=18, marker=marker, color=cmap(k), alpha=0.8, label=f"round {rnd} {trigger}",
                )  # fmt: skip
    x = np.array([r["max_force_std"] for r in pts])
    y = np.array([r["true_max_force_error"] for r in pts])
    lim = [0, 1.05 * float(max(x.max(), y.max()))]
    ax.plot(lim, lim, color="grey", lw=0.8, ls=":", label="σ = error")
    for value, name in ((lower, "lower"), (upper, "upper")):
        if value is not None and value <= lim[1]:
            ax.axvline(value, color="crimson" if name == "upper" else "orange", lw=1,
                       label=f"{name} threshold")  # fmt: skip
    ax.set_xlabel("predicted max_force_std (calibrated, eV/Å)")
    ax.set_ylabel("true max force error (eV/Å)")
    ax.set_title(f"uncertainty vs true error (Spearman {spearman(x, y):.2f}, n={len(x)})")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_learning_curve(ax: Any, rounds: Sequence[dict[str, Any]]) -> Any:
    """Validation force MAE, audit error and check-frame MAE vs number of labels."""
    n = [r["labels_total"] for r in rounds]
    ax.plot(n, [r["val_force_mae"] for r in rounds], "o-", label="validation force MAE")
    audit = [(r["labels_total"], r["audit_max_force_error"]) for r in rounds
             if r.get("audit_max_force_error") is not None]  # fmt: skip
    if audit:
        ax.plot(*zip(*audit), "^--", label="audit: mean max force error")
    check = [(r["labels_total"], r["check_force_mae"]) for r in rounds if "check_force_mae" in r]
    if check:
        ax.plot(*zip(*check), "D-", label="check frames: force MAE (the stop rule's)")
    tests = [
        (r["labels_total"], v) for r in rounds for v in (r.get("test_force_mae") or {}).values()
    ]
    if tests:
        ax.plot(*zip(*tests), "s:", label="test force MAE")
    ax.set_xlabel("reference labels")
    ax.set_ylabel("eV/Å")
    ax.set_title("learning curve")
    ax.legend(fontsize=8)
    return ax


def round_markdown(run: Any, rounds: Sequence[dict[str, Any]]) -> str:
    """Markdown with the round's plots embedded as PNG (for a Prefect artifact)."""
    from mlforce.store import LabelStore

    config = run.config()
    rows = LabelStore(run.ledger).rows(status="ok")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_uncertainty_vs_error(axes[0], rows, config.md.triggers.lower, config.md.triggers.upper)
    plot_learning_curve(axes[1], rounds)
    last = rounds[-1]
    return (
        f"### Round {last['round']}\n\n"
        f"{last['labels_added']} labels added, {last['labels_total']} in total; trigger rate "
        f"{last['triggers_per_ps']:.2f}/ps; validation force MAE "
        f"{last['val_force_mae']:.4f} eV/Å\n\n"
        f"![round {last['round']}](data:image/png;base64,{png_base64(fig)})\n"
    )


# --- the labels table (mlforce labels) ----------------------------------------------------------

LABEL_COLUMNS = [
    "id", "round", "walker", "md_step", "time_fs", "trigger", "max_force_std", "threshold",
    "true_max_force_error", "energy", "reference_seconds", "status", "attempts", "error",
]  # fmt: skip


def resolve_ledger(path: str | Path) -> tuple[Path, Path | None]:
    """(ledger, run directory or None) from a run directory or a ledger file; clear errors."""
    from mlforce.errors import MlforceError

    p = Path(path)
    if p.is_dir():
        if (p / "labels.db").is_file():
            return p / "labels.db", p
        raise MlforceError(f"{p}: not a run directory (no labels.db inside)")
    if p.is_file():
        import sqlite3

        try:
            with sqlite3.connect(f"file:{p}?mode=ro", uri=True) as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError:
            tables = set()
        if "systems" not in tables:
            raise MlforceError(f"{p}: not a label ledger (an ASE SQLite database)")
        return p, (p.parent if (p.parent / "state.json").is_file() else None)
    raise MlforceError(f"{p}: no such run directory or ledger")


def label_table(
    ledger: str | Path,
    round_: int | None = None,
    trigger: str | None = None,
    status: str | None = None,
    min_std: float | None = None,
    sort: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Rows of the ledger with :data:`LABEL_COLUMNS` (None where absent), filtered and sorted."""
    from mlforce.errors import MlforceError
    from mlforce.store import LabelStore

    if sort is not None and sort.lstrip("-") not in LABEL_COLUMNS:
        raise MlforceError(
            f"unknown sort key {sort!r}; choose one of {', '.join(LABEL_COLUMNS)} (prefix - for "
            "descending)"
        )
    filters: dict[str, Any] = {}
    if round_ is not None:
        filters["iteration"] = round_
    if trigger is not None:
        filters["trigger"] = trigger
    if status is not None:
        filters["status"] = status
    out = []
    for row in LabelStore(ledger).rows(**filters):
        item = {c: row.get(c) for c in LABEL_COLUMNS}
        item["round"] = row.get("iteration")
        if min_std is not None and (
            item["max_force_std"] is None or item["max_force_std"] < min_std
        ):
            continue
        out.append(item)
    if sort:
        key, reverse = sort.lstrip("-"), sort.startswith("-")
        present = [r for r in out if r[key] is not None]
        missing = [r for r in out if r[key] is None]
        out = sorted(present, key=lambda r: r[key], reverse=reverse) + missing
    return out[:limit] if limit else out
