"""Inspecting a campaign: `mlforce labels` and the self-contained HTML report."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from ase.io import read

from mlforce.cli import main
from mlforce.report import LABEL_COLUMNS


def test_labels_json_has_every_key_and_filters_sort(tiny_campaign, capsys):
    run_dir, _ = tiny_campaign
    assert main(["labels", str(run_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 12 and all(set(r) == set(LABEL_COLUMNS) for r in rows)
    assert main(["labels", str(run_dir / "labels.db"), "--json", "--trigger", "seed"]) == 0
    seeds = json.loads(capsys.readouterr().out)
    assert len(seeds) == 12 and {r["trigger"] for r in seeds} == {"seed"}
    assert main(["labels", str(run_dir), "--json", "--round", "2", "--sort=-max_force_std"]) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2 and {r["round"] for r in r2} == {2}
    sigmas = [r["max_force_std"] for r in r2]
    assert sigmas == sorted(sigmas, reverse=True)
    cut = sorted(sigmas)[len(sigmas) // 2]
    assert main(["labels", str(run_dir), "--json", "--min-std", str(cut), "--limit", "3"]) == 0
    some = json.loads(capsys.readouterr().out)
    assert 0 < len(some) <= 3 and all(r["max_force_std"] >= cut for r in some)
    assert main(["labels", str(run_dir), "--csv", "--status", "ok"]) == 0
    csv_lines = capsys.readouterr().out.strip().splitlines()
    assert csv_lines[0].split(",") == LABEL_COLUMNS and len(csv_lines) == len(rows) + 1


def test_export_roundtrips_with_provenance(tiny_campaign, tmp_path, capsys):
    run_dir, _ = tiny_campaign
    out = tmp_path / "sel.extxyz"
    assert main(["labels", str(run_dir), "--trigger", "uncertainty", "--export", str(out)]) == 0
    frames = read(out, ":")
    assert frames
    for atoms in frames:
        assert atoms.info["trigger"] == "uncertainty" and "max_force_std" in atoms.info
        assert atoms.get_forces().shape == (len(atoms), 3)
        assert isinstance(atoms.get_potential_energy(), float)


def test_bad_inputs_are_clear(tiny_campaign, tmp_path, capsys):
    run_dir, _ = tiny_campaign
    assert main(["labels", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    junk = tmp_path / "junk.db"
    junk.write_text("hello")
    assert main(["report", str(junk)]) == 2
    assert "not a label ledger" in capsys.readouterr().err
    assert main(["labels", str(run_dir), "--sort", "colour"]) == 2
    assert "unknown sort key 'colour'" in capsys.readouterr().err
    from mlforce.store import LabelStore

    LabelStore(tmp_path / "empty.db")
    assert main(["report", str(tmp_path / "empty.db"), "-o", str(tmp_path / "e.html")]) == 0
    assert "Nothing to show" in (tmp_path / "e.html").read_text()


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre'); out.id = 'img-check';
  out.textContent = JSON.stringify(imgs.map(i => [i.alt, i.naturalWidth]));
  document.body.appendChild(out);
});</script></body>"""


def test_report_is_self_contained_and_renders_in_chromium(tiny_campaign, tmp_path):
    run_dir, _ = tiny_campaign
    assert main(["report", str(run_dir), "-o", str(tmp_path / "report.html")]) == 0
    text = (tmp_path / "report.html").read_text()
    assert not re.search(r"(src|href)=[\"'](https?:)?//", text)  # nothing fetched from a network
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', text)
    for plot in ("labels per round by trigger", "learning curve", "uncertainty vs true error",
                 "calibration curve", "trigger rate per ps", "σ along the walkers",
                 "per-element force error"):  # fmt: skip
        assert any(plot in alt for alt in images), plot
    for fact in ("reference calls", "Stop reason", "Spearman", "AUROC"):
        assert fact in text
    # the tiny config's σ has the latent distance: the headline ranks the calibrated σ
    from mlforce.metrics import spearman
    from mlforce.store import LabelStore

    scored = [r for r in LabelStore(run_dir / "labels.db").rows() if r.get("status") == "ok"
              and "max_force_std" in r and "true_max_force_error" in r]  # fmt: skip
    assert len(scored) > 2
    expected = spearman(np.array([r["max_force_std"] for r in scored]),
                        np.array([r["true_max_force_error"] for r in scored]))  # fmt: skip
    headline = re.search(r"Spearman σ vs error<b>([-0-9.na]+)</b>", text)
    assert headline and headline.group(1) == f"{expected:.2f}"
    assert "predicted (calibrated) max_force_std" in text
    per_molecule = re.search(
        r"Per molecule.*?<td>C2H6O</td><td>(\d+)</td><td>([0-9.e-]+)</td>", text
    )
    assert per_molecule and int(per_molecule.group(1)) > 0 and float(per_molecule.group(2)) > 0
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (make test installs it when it can)")
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", CHECK))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=10000"]  # fmt: skip
    proc = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    found = re.search(r'<pre id="img-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stderr[-2000:]
    rendered = json.loads(found.group(1).replace("&quot;", '"'))
    assert len(rendered) == len(images) >= 7
    assert all(width > 0 for _, width in rendered), rendered


def test_labels_show_a_failed_labels_error_and_attempts(tmp_path, capsys):
    from ase.build import bulk

    from mlforce.labeling import label

    reference = {"kind": "ase", "calculator": "tests.helpers.mlforce_test_calcs:FlakyEMT",
                 "kwargs": {"mode": "raise"}, "retries": 2}  # fmt: skip
    ok = bulk("Cu", cubic=True)
    bad = ok.copy()
    bad.positions[0, 0] += 0.05
    ledger = tmp_path / "labels.db"
    label([ok], {"kind": "emt"}, ledger, {"trigger": "manual"}, progress=False)
    label([bad], reference, ledger, {"trigger": "manual"}, progress=False)
    capsys.readouterr()
    assert main(["labels", str(ledger), "--json", "--status", "failed"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "failed" and row["attempts"] == 3
    assert "synthetic failure" in row["error"]
    assert main(["labels", str(ledger), "--csv"]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header.split(",")[-2:] == ["attempts", "error"] and len(lines) == 2
