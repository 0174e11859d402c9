"""The Prefect flow on the tiny config: real Prefect runs, real xTB, a real SQLite ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mlforce.errors import ConfigError
from mlforce.store import LabelStore
from tests.conftest import ROOT

TINY = str(ROOT / "configs" / "tiny.yaml")
COUNTING = "tests.helpers.mlforce_test_calcs:CountingXTB"


@pytest.fixture
def harness(prefect_harness):
    return prefect_harness


@pytest.fixture
def two_rounds(tiny_campaign):
    return tiny_campaign


def _artifacts() -> list[dict]:
    """Every artifact of the test server, through its REST API."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    # Prefect 3.8's client serialises empty filters as nulls, which this server rejects
    body = {"limit": 200, "offset": 0, "sort": "CREATED_DESC"}
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def test_two_rounds_give_checkpoints_labels_and_artifacts(two_rounds):
    run_dir, state = two_rounds
    assert state["rounds_run"] == 2 and "max_rounds" in state["stop_reason"]
    # the final model is trained after the last round, on every ok label of the ledger
    assert state["final_checkpoint"].endswith("round_003/model.pt")
    assert state["labels_total"] == len(LabelStore(run_dir / "labels.db").rows(status="ok"))
    for r in (1, 2):
        assert (run_dir / f"round_{r:03d}" / "model.pt").is_file()
        assert (run_dir / f"round_{r:03d}" / "walker_0.extxyz").is_file()
    rows = LabelStore(run_dir / "labels.db").rows()
    seeds = [r for r in rows if r["trigger"] == "seed"]
    learned = [r for r in rows if r["trigger"] in ("uncertainty", "audit")]
    assert len(seeds) == 12 and learned
    for r in learned:
        keys = ("iteration", "walker", "md_step", "time_fs", "max_force_std", "threshold",
                "model_hash", "reference", "reference_seconds", "true_max_force_error")  # fmt: skip
        for key in keys:
            assert key in r, key
    artifacts = _artifacts()
    tables = [a for a in artifacts if a["type"] == "table" and a["key"].startswith("round-")]
    assert sorted(a["key"] for a in tables) == ["round-1", "round-2"]
    table = json.loads(tables[0]["data"])
    assert {"round", "labels_added", "val_force_mae", "triggers_per_ps"} <= set(table[0])
    markdown = [a for a in artifacts if a["type"] == "markdown"]
    assert any("data:image/png;base64," in a["data"] for a in markdown)


def test_failing_reference_does_not_fail_the_flow(harness, tmp_path):
    from flows.active_learning import run_campaign

    counter = tmp_path / "calls.txt"
    state = run_campaign(
        TINY, str(tmp_path / "run"), **{
            "reference.kind": "ase", "reference.calculator": COUNTING, "reference.retries": 1,
            "reference.kwargs": {"counter": str(counter), "fail_percent": 35},
            "active_learning.max_rounds": 1, "active_learning.seed.source": "rattle",
        },
    )  # fmt: skip
    rows = LabelStore(tmp_path / "run" / "labels.db").rows()
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("synthetic SCF failure" in r["error"] for r in failed)
    assert any(r["status"] == "ok" for r in rows)
    round_rows = state["rounds"]
    assert sum(r["labels_failed"] for r in round_rows) == len(
        [r for r in failed if r["iteration"] > 0]
    )


def _flow_process(run_dir, counter, home, max_rounds):
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    args = [
        sys.executable, "-m", "flows.active_learning", TINY, "--run-dir", str(run_dir),
        "--set", "reference.kind=ase", "--set", f"reference.calculator={COUNTING}",
        "--set", f"reference.kwargs={{counter: {counter}}}",
        "--set", f"active_learning.max_rounds={max_rounds}",
    ]  # fmt: skip
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )  # fmt: skip


def test_killed_run_resumes_without_repeating_reference_calls(tmp_path):
    run_dir, counter, home = tmp_path / "run", tmp_path / "calls.txt", tmp_path / "prefect"
    proc = _flow_process(run_dir, counter, home, max_rounds=3)
    state_file = run_dir / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if state_file.is_file() and len(json.loads(state_file.read_text())["rounds"]) >= 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)  # the flow and its temporary Prefect server
    proc.wait()
    first = json.loads(state_file.read_text())["rounds"]
    assert len(first) in (1, 2)
    model1 = (run_dir / "round_001" / "model.pt").stat().st_mtime_ns
    calls_before = counter.read_text().split()

    proc = _flow_process(run_dir, counter, home, max_rounds=3)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    state = json.loads(state_file.read_text())
    assert len(state["rounds"]) == 3 and state["rounds"][0] == first[0]
    assert (run_dir / "round_001" / "model.pt").stat().st_mtime_ns == model1  # not retrained
    after = counter.read_text().split()[len(calls_before) :]
    assert after  # the resumed run did label new frames ...
    # ... and never computed a structure twice, nor one computed before the kill
    assert len(after) == len(set(after)) and not set(after) & set(calls_before)
    assert "campaign stopped" in out


def test_dask_runner_gives_the_same_number_of_labels(harness, two_rounds, tmp_path):
    from flows.active_learning import run_campaign

    threaded_dir, _ = two_rounds
    listening: set[tuple[str, int]] = set()
    done = threading.Event()
    watcher = threading.Thread(target=_watch_listening, args=(listening, done), daemon=True)
    watcher.start()
    try:
        run_campaign(TINY, str(tmp_path / "run"), **{"runner.kind": "dask", "runner.workers": 2})
    finally:
        done.set()
        watcher.join()
    dask_rows = LabelStore(tmp_path / "run" / "labels.db").rows(status="ok")
    threaded_rows = LabelStore(threaded_dir / "labels.db").rows(status="ok")
    assert len(dask_rows) == len(threaded_rows)
    # the flow's sockets (Prefect's server, Dask scheduler, workers, dashboard): loopback only
    assert len(listening) >= 3, listening
    exposed = {(ip, port) for ip, port in listening if ip not in ("127.0.0.1", "::1")}
    assert not exposed, f"listening beyond loopback: {exposed}"


def _watch_listening(found: set, done: threading.Event) -> None:
    """Every listening TCP socket of this process and its children until ``done``."""
    import psutil

    me = psutil.Process()
    while not done.wait(0.2):
        pids = {me.pid} | {c.pid for c in me.children(recursive=True)}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
                found.add((conn.laddr.ip, conn.laddr.port))


def test_bad_input_fails_before_any_work(harness, tmp_path):
    from flows.active_learning import run_campaign

    with pytest.raises(ConfigError, match="config file not found"):
        run_campaign(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("active_learning:\n  rounds: 3\n")
    with pytest.raises(ConfigError, match=r"active_learning\.rounds: unknown key"):
        run_campaign(str(bad))
    dask = {"runner.kind": "dask", "runner.address": "tcp://127.0.0.1:9"}
    with pytest.raises(ConfigError, match="unreachable"):
        run_campaign(TINY, str(tmp_path / "d"), **dask)
    assert not (tmp_path / "d").exists()


def test_run_dir_of_another_config_is_refused(two_rounds):
    from flows.active_learning import run_campaign

    run_dir, _ = two_rounds
    with pytest.raises(ConfigError, match="different config"):
        run_campaign(TINY, str(run_dir), **{"md.steps": 77})
