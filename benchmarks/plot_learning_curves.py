"""Plot the learning curves of ``benchmarks/al_vs_random.py`` (its JSON) to a PNG.

``--campaign NAME=RUN_DIR`` adds the curve of another finished campaign (e.g. one driven by an
ensemble's uncertainty), read from its ``state.json`` the way ``al_vs_random.py`` reads the
MC-dropout one: round k's point is the model that drove round k (trained on the labels of the
rounds before it), the last point the final model trained on every label. With ``--json`` the
curves are also printed.

    python benchmarks/al_vs_random.py runs/demo > runs/bench/al_vs_random.json
    python benchmarks/plot_learning_curves.py runs/bench/al_vs_random.json docs/al_vs_random.png \\
        --campaign "uncertainty-driven (ensemble of 4)=runs/demo_ensemble"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def campaign_curve(run_dir: str) -> list[tuple[int, dict[str, float]]]:
    """(labels, {test set: force MAE}) per round of a finished campaign, then the final model."""
    state = json.loads((Path(run_dir) / "state.json").read_text())
    points = [(row["labels_total"] - row["labels_added"], row.get("test_force_mae") or {})
              for row in state["rounds"]]  # fmt: skip
    points.append((state["labels_total"], state.get("final_test_force_mae") or {}))
    return points


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("png")
    parser.add_argument("--campaign", action="append", default=[], metavar="NAME=RUN_DIR")
    parser.add_argument("--json-out", action="store_true", help="print every curve as JSON")
    args = parser.parse_args()
    data = json.load(open(args.json))
    curves = {
        "uncertainty-driven (MC dropout)": data["active_learning"],
        "random from xTB MD pool": data["random"],
    }
    for item in args.campaign:
        name, _, run_dir = item.partition("=")
        curves[name] = campaign_curve(run_dir)
    tests = list(data["active_learning"][0][1])
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 3.4), sharey=True)
    styles = ["o-", "s--", "^-.", "d:"]
    for ax, test in zip(axes, tests, strict=True):
        for (label, curve), style in zip(curves.items(), styles, strict=False):
            points = [(n, s[test]) for n, s in curve if test in s]
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, ms=4)
        ax.axhline(data.get("target_force_mae", 0.05), color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("reference labels")
        ax.set_title(test.replace("ethanol_test_", "ethanol test, "))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("force MAE (eV/Å)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    if args.json_out:
        print(json.dumps(curves, indent=1))


if __name__ == "__main__":
    main()
