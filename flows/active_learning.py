"""The active-learning loop as a Prefect flow: seed -> (train -> simulate -> select -> label)*.

    python -m flows.active_learning configs/ethanol_xtb.yaml [--run-dir DIR] [--set k=v] [--force]
    python -m flows.active_learning serve      # serve it as a deployment (flow.serve)
    mlforce run configs/ethanol_xtb.yaml       # the same as the first line

Without ``PREFECT_API_URL`` Prefect starts a temporary local server (nothing to set up); with
it, runs report to that server. ``runner.kind: dask`` runs walkers and labels on a Dask
cluster (a local one of ``runner.workers`` processes, or ``runner.address``).
Re-running on the same run directory resumes after the last finished round: labels already in
the ledger are never recomputed (ledger dedupe by structure hash, and the label task's cache
keyed on the ledger, the frame and the reference).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# torch, tblite and Prefect's worker threads share the cores: spinning OpenMP waits make each
# of them very slow under contention (measured), passive waits cost a few percent alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from flows.tasks import (
    check_task,
    evaluate_task,
    label_task,
    seed_file_task,
    seed_task,
    select_task,
    simulate_lockstep_task,
    simulate_task,
    train_task,
)
from mlforce import campaign
from mlforce.config import Config, load_config
from mlforce.errors import ConfigError, MlforceError

DASK_CONNECT_TIMEOUT_S = 5  # s; a scheduler answers in milliseconds


def _check_dask_address(address: str) -> None:
    """A scheduler that does not answer as Dask within the timeout is a clear error, before any
    work starts (not a flow that hangs: something else listening there, an unroutable host)."""
    import asyncio

    from distributed.comm import connect
    from distributed.comm.core import CommClosedError

    async def probe() -> None:
        comm = await connect(address, timeout=DASK_CONNECT_TIMEOUT_S)
        try:
            await asyncio.wait_for(comm.write({"op": "identity"}), DASK_CONNECT_TIMEOUT_S)
            reply = await asyncio.wait_for(comm.read(), DASK_CONNECT_TIMEOUT_S)
        finally:
            comm.abort()
        if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
            raise ValueError(f"the peer is not a Dask scheduler (answered {str(reply)[:80]!r})")

    try:
        asyncio.run(asyncio.wait_for(probe(), 3 * DASK_CONNECT_TIMEOUT_S))
    except (OSError, ValueError, TypeError, MemoryError, CommClosedError,
            asyncio.TimeoutError) as err:  # fmt: skip
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(
            f"runner.address {address!r}: no Dask scheduler answered there ({reason})"
        ) from None


def task_runner(config: Config) -> Any:
    """Prefect's thread pool (local) or a DaskTaskRunner (runner.kind: dask)."""
    r = config.runner
    if r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if r.address:
            _check_dask_address(r.address)
            return DaskTaskRunner(address=r.address)
        # Loopback only: the scheduler, workers and dashboard of a local cluster listen on
        # 127.0.0.1 (Dask's dashboard binds every interface by default).
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": r.workers, "processes": True, "threads_per_worker": 1,
                "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0",
            }
        )  # fmt: skip
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=r.workers)


def _round_artifacts(run: campaign.RunDir, rows: list[dict[str, Any]]) -> None:
    """One table artifact (all rounds so far) and one markdown artifact with the plots."""
    last = rows[-1]
    table = [
        {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("checkpoint", "test_force_mae")
        }
        for r in rows
    ]
    create_table_artifact(
        key=f"round-{last['round']}", table=table,
        description=f"Active learning, round {last['round']}: {run.root}",
    )  # fmt: skip
    try:
        from mlforce.report import round_markdown

        create_markdown_artifact(
            key=f"round-{last['round']}-plots", markdown=round_markdown(run, rows),
            description="uncertainty vs true error, learning curve",
        )  # fmt: skip
    except Exception as err:  # plots are a nicety: never fail a round for them
        get_run_logger().warning(f"round plots failed: {err}")


@flow(name="mlforce-active-learning", log_prints=True)
def active_learning(
    config: str, run_dir: str | None = None, force: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Run (or resume) an active-learning campaign; returns the final state.

    ``config``: YAML path; ``run_dir``: default ``runs/<name>``; ``overrides``: dotted keys
    (``{"md.steps": 500}``) applied to the config; ``force``: resume a run directory created
    by a different config.
    """
    logger = get_run_logger()
    cfg = load_config(config, overrides or None)
    run = campaign.prepare_run_dir(cfg, run_dir or f"runs/{cfg.name}", force=force)
    state = run.state()
    rows: list[dict[str, Any]] = state.get("rounds", [])
    if state.get("stop_reason"):
        logger.info(f"{run.root}: campaign already finished ({state['stop_reason']})")
        return state
    if not rows and not state.get("seeded"):
        t0 = time.perf_counter()
        unlabelled = seed_file_task(str(run.root))
        if unlabelled is None:  # labelled as it is made (the reference's MD) or given
            seeded = seed_task(str(run.root))
        else:  # rattled or sampled frames: labelled in parallel, like a round's selection
            path, n = unlabelled
            parts = [f.result() for f in label_task.map(str(run.root), path, list(range(n)))]
            seeded = {k: sum(x.get(k, 0) for x in parts)
                      for k in ("ok", "failed", "skipped", "reference_seconds")}  # fmt: skip
        logger.info(f"seed: {seeded} in {time.perf_counter() - t0:.1f} s")
        state["seeded"] = seeded
        run.write_state(state)
    if cfg.active_learning.check is not None:  # made once; a resumed campaign re-reads it
        t0 = time.perf_counter()
        check = check_task(str(run.root))
        seconds = time.perf_counter() - t0
        if check and check.startswith("unavailable"):
            logger.warning(f"accuracy check {check}: the trigger rate alone will decide")
        else:
            logger.info(f"accuracy check frames: {check} ({seconds:.1f} s)")
    specs = campaign.walker_specs(cfg)
    round_ = len(rows)
    reason = campaign.convergence(rows, cfg) if rows else None  # a resumed, finished loop
    while reason is None:
        round_ += 1
        t0 = time.perf_counter()
        trained = train_task(str(run.root), round_)
        logger.info(
            f"round {round_}: trained on {trained['n_train']} labels, validation force MAE "
            f"{trained['val_force_mae']:.4f} eV/Å"
        )
        if campaign.use_lockstep(cfg):  # one task, all walkers batched (GPU)
            walkers = simulate_lockstep_task(str(run.root), round_, specs)
        else:
            walkers = [f.result() for f in simulate_task.map(str(run.root), round_, specs)]
        files = [w["candidates_file"] for w in walkers]
        chosen = select_task(str(run.root), round_, files)
        labelled = [
            f.result()
            for f in label_task.map(
                str(run.root), chosen["selected_file"], list(range(chosen["n_selected"]))
            )
        ]
        row = evaluate_task(str(run.root), round_, trained, walkers, labelled)
        row["n_candidates"] = chosen["n_candidates"]
        row["wall_seconds"] = time.perf_counter() - t0
        rows.append(row)
        state["rounds"] = rows
        run.write_state(state)
        logger.info(
            f"round {round_}: {row['labels_added']} labels added ({row['labels_failed']} failed), "
            f"{row['labels_total']} in total; trigger rate {row['triggers_per_ps']:.2f}/ps; "
            f"σ mean {row['sigma_mean']:.3f} eV/Å; {_extras(row)}"
        )
        _round_artifacts(run, rows)
        reason = campaign.convergence(rows, cfg)
        note = campaign.convergence_note(rows, cfg) if reason is None else None
        if note:
            logger.info(f"round {round_}: {note}")
    # the last round's labels came after its model: one more training on every label
    final_model = train_task(str(run.root), len(rows) + 1, final=True)
    final = campaign.finalize(run, rows, reason, final_model)
    state.update(final)
    run.write_state(state)
    logger.info(f"stopped: {reason}; run directory {run.root}")
    return state


def _extras(row: dict[str, Any]) -> str:
    """The round's audits and accuracy check, for its log line."""
    out = f"{row['audits']} audits"
    if row["audits"]:
        out += f" (mean max force error {row['audit_max_force_error']:.3f} eV/Å)"
    if "check_force_mae" in row:
        out += f"; force MAE on the check frames {row['check_force_mae']:.4f} eV/Å"
    return out


def run_campaign(
    config: str, run_dir: str | None = None, force: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Validate the config, pick the task runner it asks for, and run the flow."""
    cfg = load_config(config, overrides or None)  # fail early, before Prefect starts
    campaign.check_campaign(cfg)  # the reference, and the structures it will see
    run_dir = run_dir or f"runs/{cfg.name}"
    campaign.check_resumable(cfg, run_dir, force)
    runner = task_runner(cfg)
    with campaign.run_lock(run_dir):  # one campaign per run directory, for the flow's life
        return active_learning.with_options(task_runner=runner)(config, run_dir, force, **overrides)


def _end_group(signum: int, _frame: Any) -> None:
    """SIGTERM (or the death of `mlforce run`): end the flow with everything it started."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.active_learning")
    parser.add_argument("config", help="YAML config, or 'serve' to serve the flow")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>)")
    parser.add_argument("--force", action="store_true", help="resume despite a config change")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    if args.config == "serve":
        active_learning.serve(name="mlforce-active-learning")
        return 0
    from mlforce.cli import _parse_overrides

    if os.getpgrp() == os.getpid():  # run by `mlforce run`: this process leads its group
        signal.signal(signal.SIGTERM, _end_group)

    try:
        overrides = _parse_overrides(args.set)
        state = run_campaign(args.config, args.run_dir, args.force, **overrides)
    except MlforceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(campaign.summary_text(state))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
