"""Reading labelled structures (extended XYZ) and turning them into graphs.

Training files are extended XYZ with the reference ``energy`` (eV) in ``info`` and ``forces``
(eV/Å) in ``arrays``: what ``ase.io.write`` produces from atoms with a calculator attached, and
what ``ase.io.read`` gives back as calculator results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import read
from torch_geometric.data import Data

from mlforce.errors import StructureError
from mlforce.graph import atoms_to_graph, check_atoms, reference_labels


def read_structures(path: str | Path) -> list[Atoms]:
    """All frames of a structure file (any format ASE reads); clear error if it does not parse."""
    path = Path(path)
    if not path.is_file():
        raise StructureError(f"structure file not found: {path}")
    try:
        frames = read(str(path), index=":")
    except Exception as err:  # ASE raises many types for malformed files
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(err, KeyError):  # ASE's symbol lookup: an element it does not know
            msg = f"unknown element symbol {err.args[0]!r}"
        raise StructureError(f"{path}: cannot parse structure file ({msg})") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    if not frames:
        raise StructureError(f"{path}: no structures in file")
    for k, atoms in enumerate(frames):
        check_atoms(atoms, where=f"{path} frame {k}")
    return list(frames)


def read_labelled(paths: str | Path | Sequence[str | Path]) -> list[Atoms]:
    """Frames with reference energy and forces from one or more files; each frame is checked."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames: list[Atoms] = []
    for path in paths:
        for k, atoms in enumerate(read_structures(path)):
            reference_labels(atoms, where=f"{path} frame {k}")
            frames.append(atoms)
    return frames


def species_of(frames: Sequence[Atoms]) -> list[int]:
    """Sorted distinct atomic numbers in ``frames``."""
    return sorted({int(z) for atoms in frames for z in atoms.numbers})


def graphs_from_frames(
    frames: Sequence[Atoms],
    species: Sequence[int],
    cutoff: float,
    dtype: torch.dtype = torch.float32,
    with_labels: bool = False,
) -> list[Data]:
    """One graph per frame (see :func:`mlforce.graph.atoms_to_graph`)."""
    return [
        atoms_to_graph(a, species, cutoff, dtype, with_labels=with_labels, where=f"frame {k}")
        for k, a in enumerate(frames)
    ]


def random_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic shuffled split of ``range(n)`` into (train, validation) indices."""
    if n < 2:
        raise StructureError(f"need at least 2 labelled structures to train, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
