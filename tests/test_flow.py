"""The Prefect flow on the tiny config: real Prefect runs, real xTB, a real SQLite ledger."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from ase.io import read

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
    # md.bias.rounds = 1: round 1's walkers ran on the biased potential, round 2's did not
    biased = read(run_dir / "round_001" / "walker_0.extxyz", ":")
    assert all(f.info["bias_energy"] < 0.0 for f in biased)
    assert all(
        "bias_energy" not in f.info for f in read(run_dir / "round_002" / "walker_0.extxyz", ":")
    )
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


def test_failing_reference_does_not_fail_the_flow(harness, tmp_path, capsys):
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
    from mlforce.cli import main

    capsys.readouterr()
    assert main(["labels", str(tmp_path / "run"), "--json", "--status", "failed"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown) == len(failed)
    assert all(r["attempts"] == 2 and "synthetic SCF failure" in r["error"] for r in shown)
    # the accuracy check's reference MD failed too: no check frames, no scores, no crash
    assert not (tmp_path / "run" / "check_frames.extxyz").exists()
    assert all("check_force_mae" not in r for r in round_rows)


def test_transient_reference_failures_in_seed_md_and_labels_are_retried(harness, tmp_path):
    from flows.active_learning import run_campaign

    counter = tmp_path / "calls.txt"
    state = run_campaign(
        TINY, str(tmp_path / "run"), **{
            "reference.kind": "ase", "reference.calculator": COUNTING, "reference.retries": 5,
            "reference.kwargs": {"counter": str(counter), "transient_percent": 30},
            "active_learning.max_rounds": 1,
        },
    )  # fmt: skip
    log = counter.read_text().split("\n")
    assert sum(line.startswith("transient") for line in log) > 20  # it did fail, often
    rows = LabelStore(tmp_path / "run" / "labels.db").rows()
    assert sum(r["trigger"] == "seed" for r in rows) == 12  # the whole seed MD, despite them
    assert state["rounds"][0]["labels_added"] > 0
    assert all(r["status"] == "ok" for r in rows)  # five retries rescued every call


@pytest.fixture(scope="module")
def prefect_db(tmp_path_factory):
    """Prefect's database, migrated once. Each flow started as a process below gets its own
    PREFECT_HOME holding a copy, so its temporary server skips Prefect's migrations (measured
    here: a first flow 25 s with a fresh home, 15 s with a migrated copy)."""
    home = tmp_path_factory.mktemp("prefect_template")
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    subprocess.run(
        [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return home / "prefect.db"


def _prefect_home(path, prefect_db):
    """A fresh PREFECT_HOME at ``path`` with the migrated database."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(prefect_db, path / "prefect.db")
    return path


def _flow_process(run_dir, counter, home, max_rounds, **reference_kwargs):
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    kwargs = ", ".join(f"{k}: {v}" for k, v in {"counter": counter, **reference_kwargs}.items())
    args = [
        sys.executable, "-m", "flows.active_learning", TINY, "--run-dir", str(run_dir),
        "--set", "reference.kind=ase", "--set", f"reference.calculator={COUNTING}",
        "--set", f"reference.kwargs={{{kwargs}}}",
        "--set", f"active_learning.max_rounds={max_rounds}",
        # the accuracy check's MD (made again after a kill; not a label) would shift the
        # call numbers these tests kill at, and its start is the seed MD's start structure
        "--set", "active_learning.check=null",
    ]  # fmt: skip
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )  # fmt: skip


def _kill_when(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)  # the flow and everything it started
            proc.wait()
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached the kill point; exit {proc.poll()}: {proc.stdout.read()}")


def test_kills_during_seed_labels_and_training_repeat_no_reference_call(tmp_path, prefect_db):
    from tests.helpers.mlforce_test_calcs import finished_calls

    run_dir, counter = tmp_path / "run", tmp_path / "calls.txt"
    home = _prefect_home(tmp_path / "prefect", prefect_db)
    ledger = run_dir / "labels.db"
    # the seed MD makes 131 calls (10 equilibration + 12 x 10 steps + the start); the windows
    # of slow calls give each kill a moment inside the seed MD and inside round 1's labels
    slow = {"slow": [[40, 44], [134, 138]], "slow_s": 1.0}

    def calls() -> int:
        return len(finished_calls(counter)) if counter.is_file() else 0

    def rows(**filters) -> list:
        return LabelStore(ledger).rows(**filters) if ledger.is_file() else []

    # 1. kill during the seed's reference MD
    proc = _flow_process(run_dir, counter, home, 2, **slow)
    _kill_when(proc, lambda: calls() >= 41)
    assert 0 < len(rows(trigger="seed")) < 12
    # 2. resume; kill during round 1's labelling (its calls 134-137 are slow)
    proc = _flow_process(run_dir, counter, home, 2, **slow)
    _kill_when(proc, lambda: len(rows(iteration=1)) >= 2)
    assert len(rows(trigger="seed")) == 12
    labelled_before = len(rows(iteration=1))
    # 3. resume; kill during round 2's training (right after round 1 is recorded)
    proc = _flow_process(run_dir, counter, home, 2, **slow)
    state_file = run_dir / "state.json"
    _kill_when(proc, lambda: len(json.loads(state_file.read_text()).get("rounds", [])) >= 1)
    assert not (run_dir / "round_002" / "model.pt").is_file()
    # 4. resume to the end
    proc = _flow_process(run_dir, counter, home, 2, **slow)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "campaign stopped" in out
    done = finished_calls(counter)
    assert len(done) == len(set(done)), "a finished reference call was repeated"
    with sqlite3.connect(ledger) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ledger_rows = rows()
    assert {r["structure_hash"] for r in ledger_rows if r["status"] == "ok"} <= set(done)
    assert len(rows(iteration=1)) >= labelled_before  # nothing lost
    state = json.loads(state_file.read_text())
    assert state["labels_total"] == len(rows(status="ok"))
    for r in (1, 2):  # a round redone after a kill stays within its budget
        assert 0 < len(rows(iteration=r)) <= 8


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
    with pytest.raises(ConfigError, match="no Dask scheduler answered"):
        run_campaign(TINY, str(tmp_path / "d"), **dask)
    assert not (tmp_path / "d").exists()
    # PySCF on a periodic cell: refused before the Prefect server starts or a file is written
    cell = tmp_path / "cu.extxyz"
    from ase.build import bulk
    from ase.io import write

    write(cell, bulk("Cu", cubic=True))
    pyscf = {"reference.kind": "pyscf", "md.structures": [str(cell)]}
    with pytest.raises(ConfigError, match=r"cu\.extxyz: reference\.kind 'pyscf': periodic"):
        run_campaign(TINY, str(tmp_path / "p"), **pyscf)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("peer", ["silent", "garbage"])
def test_a_dask_address_where_something_else_listens_fails_fast(tmp_path, peer, monkeypatch):
    import socket as socket_

    from flows.active_learning import run_campaign

    # the mechanism, not the shipped 5 s: a silent peer costs 3 timeouts of this test's 1 s
    monkeypatch.setattr("flows.active_learning.DASK_CONNECT_TIMEOUT_S", 1)

    server = socket_.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        held = []
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            if peer == "garbage":
                conn.sendall(b"\xff" * 64 + b"HTTP/1.1 200 OK\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    started = time.time()
    try:
        with pytest.raises(ConfigError, match="no Dask scheduler answered"):
            run_campaign(TINY, str(tmp_path / "d"), **{"runner.kind": "dask",
                                                        "runner.address": address})  # fmt: skip
    finally:
        stop.set()
        thread.join()
        server.close()
    assert time.time() - started < 60 and not (tmp_path / "d").exists()


def test_a_real_dask_scheduler_passes_the_check():
    from distributed import LocalCluster

    from flows.active_learning import _check_dask_address

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        _check_dask_address(cluster.scheduler_address)


def test_run_dir_of_another_config_is_refused(two_rounds):
    from flows.active_learning import run_campaign

    run_dir, _ = two_rounds
    with pytest.raises(ConfigError, match="different config"):
        run_campaign(TINY, str(run_dir), **{"md.steps": 77})


def test_run_lock_is_exclusive_and_survives_a_dead_holder(tmp_path):
    from mlforce.campaign import run_lock
    from mlforce.errors import MlforceError

    with run_lock(tmp_path / "run") as path:
        assert f"PID {os.getpid()} on " in path.read_text()
        with pytest.raises(MlforceError, match=rf"is in use by PID {os.getpid()} on "):
            with run_lock(tmp_path / "run"):
                pass
    # a lock file left by a process that died: the kernel dropped its flock, so it is taken over
    (tmp_path / "run" / ".lock").write_text("PID 999999 on elsewhere since long ago")
    with run_lock(tmp_path / "run") as path:
        assert f"PID {os.getpid()}" in path.read_text()


def test_a_second_flow_on_the_same_run_directory_exits_at_once(tmp_path, prefect_db):
    run_dir, counter = tmp_path / "run", tmp_path / "calls.txt"
    home = _prefect_home(tmp_path / "prefect", prefect_db)
    first = _flow_process(run_dir, counter, home, max_rounds=1)
    lock = run_dir / ".lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.is_file() and lock.read_text()):
        time.sleep(0.1)
    assert first.poll() is None
    started = time.time()
    second = _flow_process(run_dir, counter, home, max_rounds=1)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and time.time() - started < 60
    line = out.strip()
    assert "\n" not in line and f"is in use by PID {first.pid} on " in line, out
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    state = json.loads((run_dir / "state.json").read_text())
    rows = LabelStore(run_dir / "labels.db").rows()
    added = sum(r["labels_added"] + r["labels_failed"] for r in state["rounds"])
    assert len(rows) == state["seeded"]["ok"] + added  # exactly one campaign's rows
    from tests.helpers.mlforce_test_calcs import finished_calls

    calls = finished_calls(counter)
    assert len(calls) == len(set(calls))  # no structure computed twice


def _ledger_by_round(run_dir) -> dict[int, list[tuple[str, str, str]]]:
    """Per round: sorted (structure hash, trigger, status). Rows of one round are written by
    parallel label tasks in the order they finish; their content is what must not vary."""
    out: dict[int, list] = {}
    for r in LabelStore(run_dir / "labels.db").rows():
        out.setdefault(r["iteration"], []).append((r["structure_hash"], r["trigger"], r["status"]))
    return {k: sorted(v) for k, v in out.items()}


def test_same_config_same_seed_same_campaign_with_two_workers(harness, two_rounds, tmp_path):
    from flows.active_learning import run_campaign

    first_dir, first = two_rounds
    state = run_campaign(TINY, str(tmp_path / "again"))  # runner.workers = 2, as the first
    assert _ledger_by_round(tmp_path / "again") == _ledger_by_round(first_dir)
    assert state["final_val_force_mae"] == first["final_val_force_mae"]
    assert state["final_test_force_mae"] == first["final_test_force_mae"]


@pytest.mark.parametrize(
    "how", ["sigterm_to_mlforce_run", "sigkill_to_mlforce_run", "sigkill_to_the_flow"]
)
def test_mlforce_run_leaves_no_process_behind(tmp_path, how, prefect_db):
    import psutil

    home = _prefect_home(tmp_path / "prefect", prefect_db)
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlforce.cli", "run", TINY, "--run-dir", str(tmp_path / "run"),
         "--set", "active_learning.max_rounds=5"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    supervisor = psutil.Process(proc.pid)
    deadline = time.time() + 180
    seen: dict[int, psutil.Process] = {}
    while time.time() < deadline:  # until the flow and Prefect's temporary server are up
        for child in supervisor.children(recursive=True):
            seen.setdefault(child.pid, child)
        if (tmp_path / "run" / "state.json").is_file() and len(seen) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(seen) >= 2
    flow = supervisor.children()[0]
    if how == "sigterm_to_mlforce_run":
        proc.send_signal(signal.SIGTERM)
    elif how == "sigkill_to_mlforce_run":
        proc.kill()
    else:
        flow.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    _, alive = psutil.wait_procs(list(seen.values()), timeout=30)
    assert not alive, [p.cmdline() for p in alive]
