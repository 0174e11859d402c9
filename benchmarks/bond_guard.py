"""How much room the bond guard leaves: bond stretch and close contacts in reference MD.

For each structure file, relative to the covalent bonds of ``--start`` (pairs closer than
``--factor`` x the sum of covalent radii, :func:`mlforce.selection.bond_pairs`): the largest
distance / (r_i + r_j) over bonded pairs, the smallest over non-bonded pairs, and how many
frames the guard would trip on. The factor must sit between the two.

    python benchmarks/bond_guard.py datasets/ethanol_test_800K.extxyz \\
        datasets/ethanol_train.extxyz datasets/ethanol_test_300K.extxyz

Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from ase.data import covalent_radii
from ase.io import read

from mlforce.selection import bond_pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--start", default="data/ethanol.xyz")
    parser.add_argument("--factor", type=float, default=1.35)
    args = parser.parse_args()
    start = read(args.start)
    n = len(start)
    bonds = bond_pairs(start, args.factor)
    bonded = np.zeros((n, n), dtype=bool)
    bonded[bonds // n, bonds % n] = True
    bonded |= bonded.T
    radii = covalent_radii[start.numbers]
    scale = radii[:, None] + radii[None, :]
    other = ~bonded & ~np.eye(n, dtype=bool)
    result = {"start": args.start, "factor": args.factor, "bonds": len(bonds), "files": {}}
    for path in args.files:
        frames = read(path, ":")
        stretch, contact, trips = [], [], 0
        for atoms in frames:
            ratio = atoms.get_all_distances(mic=bool(atoms.pbc.any())) / scale
            stretch.append(float(ratio[bonded].max()))
            contact.append(float(ratio[other].min()))
            trips += not np.array_equal(bond_pairs(atoms, args.factor), bonds)
        result["files"][path] = {
            "frames": len(frames),
            "bonded_max_ratio": max(stretch),
            "nonbonded_min_ratio": min(contact),
            "frames_tripping": trips,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
