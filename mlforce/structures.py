"""Starting structures built by a command rather than shipped as files: liquid-water boxes.

``mlforce build water --molecules 32`` writes a periodic cubic box of randomly oriented water
molecules at a target density; MD then equilibrates it. Sizes are small enough to rebuild at
will, so no large structure file is committed.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms

WATER_MASS = 18.015  # g/mol
AVOGADRO = 6.02214076e23  # 1/mol


def box_length(n_molecules: int, density: float) -> float:
    """Edge (Å) of the cubic box that holds ``n_molecules`` waters at ``density`` (g/cm³)."""
    if n_molecules < 1:
        raise ValueError(f"a water box needs at least one molecule, got {n_molecules}")
    if not density > 0:
        raise ValueError(f"density must be > 0 g/cm³, got {density}")
    grams = n_molecules * WATER_MASS / AVOGADRO
    return (grams / density) ** (1 / 3) * 1e8


def water_box(
    n_molecules: int, density: float = 1.0, seed: int = 0, min_distance: float = 1.6
) -> Atoms:
    """A periodic cubic box of ``n_molecules`` randomly oriented waters at ``density`` g/cm³.

    Molecules sit on a jittered cubic grid (the smallest grid that holds them), each rotated at
    random until no atom comes closer than ``min_distance`` (Å) to another molecule's (periodic
    images included); the O–H geometry is ASE's gas-phase water. Atoms are ordered O, H, H per
    molecule. Raises ValueError when no such placement is found (density too high).
    """
    from ase.build import molecule
    from ase.geometry import get_distances
    from scipy.spatial.transform import Rotation

    length = box_length(n_molecules, density)
    per_side = int(np.ceil(n_molecules ** (1 / 3) - 1e-9))
    spacing = length / per_side
    rng = np.random.default_rng(seed)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    order = np.argsort(water.numbers)[::-1]  # O first
    numbers, positions = [], []
    sites = [(i, j, k) for i in range(per_side) for j in range(per_side) for k in range(per_side)]
    chosen = rng.permutation(len(sites))[:n_molecules]
    cell = np.eye(3) * length
    for site in sorted(chosen):
        for _ in range(200):
            rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
            centre = (np.asarray(sites[site]) + 0.5 + rng.uniform(-0.1, 0.1, 3)) * spacing
            placed = water.positions[order] @ rot.T + centre
            if not positions:
                break
            _, d = get_distances(placed, np.asarray(positions), cell=cell, pbc=True)
            if d.min() >= min_distance:
                break
        else:
            raise ValueError(
                f"no placement of {n_molecules} waters at {density} g/cm³ keeps molecules "
                f"{min_distance} Å apart; lower the density or min_distance"
            )
        numbers += list(water.numbers[order])
        positions += list(placed)
    box = Atoms(numbers, positions=positions, cell=[length] * 3, pbc=True)
    box.wrap()
    return box


def density(atoms: Atoms) -> float:
    """Mass density of a periodic structure (g/cm³)."""
    volume = atoms.get_volume()  # Å^3
    if not volume > 0:
        raise ValueError("density needs a periodic cell with a non-zero volume")
    return float(atoms.get_masses().sum() / AVOGADRO / (volume * 1e-24))
