"""Water campaign: close intermolecular H–H contacts in the walkers' MD, and what σ said there.

GFN1-xTB MD of liquid water keeps every atom of one molecule ≥ 1.4 Å from every atom of
another (docs/benchmarks.md 39: the closest approach over 10 ps). A model without training
data at shorter range can let two hydrogens of different molecules sit ~1 Å apart: a hole in
the potential. For each round of a campaign run directory this reads

- the walkers' stored frames (``round_NNN/walker_*.extxyz``): how many have an intermolecular
  H–H distance below ``--contact`` Å, and the shortest one;
- the ledger's labels of that round: their stored σ (``max_force_std``, the walker's calibrated
  σ) and true largest per-atom force error, for frames with and without such a contact.

    python benchmarks/water_contacts.py runs/water_clean

Prints one JSON object (per round). Water boxes must be ordered O, H, H per molecule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def hh_contact(atoms) -> float:
    """Shortest H–H distance (Å, minimum image) between different molecules of a water box."""
    molecule = np.arange(len(atoms)) // 3
    hydrogen = atoms.numbers == 1
    pairs = (molecule[:, None] != molecule[None, :]) & hydrogen[:, None] & hydrogen[None, :]
    return float(atoms.get_all_distances(mic=True)[pairs].min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--contact", type=float, default=1.3, help="Å")
    args = parser.parse_args()
    from ase.io import read

    from mlforce.store import LabelStore

    root = Path(args.run_dir)
    labels = LabelStore(root / "labels.db").atoms()
    rounds = []
    for folder in sorted(root.glob("round_[0-9][0-9][0-9]")):
        k = int(folder.name.split("_")[1])
        walkers = []
        for path in sorted(folder.glob("walker_*.extxyz")):
            hh = np.array([hh_contact(f) for f in read(path, ":")])
            walkers.append({"walker": path.stem, "frames": len(hh),
                            "fraction_in_contact": float(np.mean(hh < args.contact)),
                            "shortest_hh_A": float(hh.min())})  # fmt: skip
        groups: dict[str, list] = {"contact": [], "no_contact": []}
        for a in labels:
            if a.info.get("iteration") != k or "true_max_force_error" not in a.info:
                continue
            key = "contact" if hh_contact(a) < args.contact else "no_contact"
            sigma = a.info.get("max_force_std", np.nan)
            groups[key].append((sigma, a.info["true_max_force_error"]))
        summary = {}
        for key, rows in groups.items():
            if rows:
                s, e = np.array(rows, dtype=float).T
                summary[key] = {"labels": len(rows), "sigma_median": float(np.nanmedian(s)),
                                "error_median": float(np.median(e))}  # fmt: skip
        rounds.append({"round": k, "walkers": walkers, "labels": summary})
    print(json.dumps({"run_dir": str(root), "contact_A": args.contact, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
