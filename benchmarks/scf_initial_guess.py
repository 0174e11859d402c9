"""Does the previous frame's SCF density help the next one? B3LYP/def2-SVP (density fitting)
SCF cycles and time with PySCF's default guess and with ``dm0`` = the previous frame's
converged density, for consecutive frames of a trajectory. One thread. Prints JSON lines.

    python benchmarks/scf_initial_guess.py datasets/ethanol_train.extxyz --frames 0:5  # 10 fs
    python benchmarks/scf_initial_guess.py datasets/ethanol_test_300K.extxyz --frames 0:60:10
"""

from __future__ import annotations

import argparse
import json
import time

from ase.io import read


def run(atoms, dm0=None):
    from pyscf import dft, gto

    mol = gto.M(atom=list(zip(atoms.get_chemical_symbols(), atoms.positions, strict=True)),
                unit="Angstrom", basis="def2-svp", verbose=0)  # fmt: skip
    mf = dft.KS(mol, xc="b3lyp").density_fit()
    mf.conv_tol = 1e-10
    t0 = time.perf_counter()
    energy = mf.kernel(dm0=dm0)
    return mf.cycles, time.perf_counter() - t0, energy, mf.make_rdm1()


def main() -> None:
    from pyscf.lib import num_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--frames", default="0:5", help="ASE index, e.g. 0:60:10")
    args = parser.parse_args()
    num_threads(1)
    previous = None
    for atoms in read(args.data, args.frames):
        cycles, seconds, energy, dm = run(atoms)
        if previous is not None:
            c1, s1, e1, _ = run(atoms, previous)
            print(json.dumps({"default_cycles": cycles, "default_seconds": seconds,
                              "dm0_cycles": c1, "dm0_seconds": s1,
                              "energy_difference_ha": float(abs(e1 - energy))}))  # fmt: skip
        previous = dm


if __name__ == "__main__":
    main()
