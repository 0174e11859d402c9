"""Seeds sampled by a cheaper reference: xTB MD drives, the campaign's reference labels."""

from __future__ import annotations

import numpy as np
from ase.io import read

from mlforce.store import LabelStore
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
COUNTING = "tests.helpers.mlforce_test_calcs:CountingXTB"


def test_a_sampler_drives_the_seed_md_and_the_reference_labels_its_frames(tmp_path):
    from tblite.ase import TBLite

    from mlforce.campaign import label_frame, prepare_run_dir, seed_file
    from mlforce.config import load_config
    from mlforce.md import load_start_structure
    from tests.helpers.mlforce_test_calcs import finished_calls

    counter = tmp_path / "calls.txt"
    cfg = load_config(TINY, {
        "reference.kind": "ase", "reference.calculator": COUNTING,
        "reference.kwargs": {"counter": str(counter)},
        "active_learning.seed.sampler": {"kind": "xtb", "method": "GFN1-xTB"},
    })  # fmt: skip
    run = prepare_run_dir(cfg, tmp_path / "run")
    path, n = seed_file(run)
    assert n == cfg.active_learning.seed.frames == 12
    assert not counter.exists(), "the sampler's MD must not call the reference"
    frames = read(path, ":")
    assert all(f.info["trigger"] == "seed" and f.info["iteration"] == 0 for f in frames)
    steps = [f.info["md_step"] for f in frames]
    assert steps == sorted(steps) and len(set(steps)) == n
    start = load_start_structure(cfg.md.structures[0])
    assert min(np.abs(f.positions - start.positions).max() for f in frames) > 0.05  # MD moved

    for i in range(n):
        assert label_frame(run, path, i)["ok"] == 1
    rows = LabelStore(run.ledger).rows(trigger="seed", status="ok")
    assert len(rows) == n and len(finished_calls(counter)) == n
    assert {r["walker"] for r in rows} == {0} and sorted(r["md_step"] for r in rows) == steps
    # the stored label is the reference's (GFN2, CountingXTB's default), not the sampler's GFN1
    first = next(r for r in rows if r["md_step"] == steps[0])
    atoms = frames[0].copy()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    assert abs(atoms.get_potential_energy() - first["energy"]) < 1e-6
    atoms.calc = TBLite(method="GFN1-xTB", verbosity=0)
    assert abs(atoms.get_potential_energy() - first["energy"]) > 1.0

    # a resumed campaign finds the same frames and repeats no finished call
    assert seed_file(run) == (path, n)
    for i in range(n):
        assert label_frame(run, path, i)["skipped"] == 1
    assert len(finished_calls(counter)) == n
