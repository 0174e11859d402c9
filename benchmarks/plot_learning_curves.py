"""Plot the learning curves of ``benchmarks/al_vs_random.py`` (its JSON) to a PNG.

python benchmarks/al_vs_random.py runs/demo > runs/bench/al_vs_random.json
python benchmarks/plot_learning_curves.py runs/bench/al_vs_random.json docs/al_vs_random.png
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json")
    parser.add_argument("png")
    args = parser.parse_args()
    data = json.load(open(args.json))
    tests = list(data["active_learning"][0][1])
    fig, axes = plt.subplots(1, len(tests), figsize=(4.2 * len(tests), 3.4), sharey=True)
    for ax, test in zip(axes, tests, strict=True):
        for key, label, style in (("active_learning", "uncertainty-driven (MC dropout)", "o-"),
                                  ("random", "random from xTB MD pool", "s--")):  # fmt: skip
            n = [row[0] for row in data[key]]
            mae = [row[1][test] for row in data[key]]
            ax.plot(n, mae, style, label=label, ms=4)
        ax.axhline(data.get("target_force_mae", 0.05), color="grey", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("reference labels")
        ax.set_title(test.replace("ethanol_test_", "ethanol test, "))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("force MAE (eV/Å)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)


if __name__ == "__main__":
    main()
