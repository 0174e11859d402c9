"""Water boxes built by command: composition, density, no overlaps, periodic, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read

from mlforce.cli import main
from mlforce.structures import box_length, density, water_box


@pytest.mark.parametrize("n", [1, 4, 32])
def test_water_box_has_the_density_and_no_overlap(n):
    box = water_box(n, density=1.0, seed=3)
    assert box.get_chemical_formula() == (f"H{2 * n}O{n}" if n > 1 else "H2O")
    assert box.pbc.all() and abs(density(box) - 1.0) < 1e-9
    assert np.isclose(box.cell.lengths(), box_length(n, 1.0)).all()
    d = box.get_all_distances(mic=True)
    molecule = np.arange(len(box)) // 3  # O, H, H per molecule
    other = molecule[:, None] != molecule[None, :]
    if n > 1:
        assert d[other].min() >= 1.6
    same = ~other & ~np.eye(len(box), dtype=bool)
    assert 0.9 < d[same].min() and d[same].max() < 1.6  # intact: O-H 0.97, H-H 1.52 Å
    assert np.allclose(water_box(n, seed=3).positions, box.positions)
    assert not np.allclose(water_box(n, seed=4).positions, box.positions)


def test_build_command_writes_a_periodic_box_and_refuses_an_impossible_one(tmp_path, capsys):
    out = tmp_path / "w.xyz"
    assert main(["build", "water", "--molecules", "8", "--out", str(out)]) == 0
    box = read(out)
    assert len(box) == 24 and box.pbc.all() and abs(density(box) - 1.0) < 1e-6
    assert "8 water molecules, 24 atoms" in capsys.readouterr().out
    assert main(["build", "water", "--molecules", "8", "--density", "3", "--out", str(out)]) == 2
    assert "no placement of 8 waters at 3.0 g/cm³" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one molecule"):
        water_box(0)
