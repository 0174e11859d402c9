"""Thin Prefect tasks around :mod:`mlforce.campaign`: paths and JSON-able values in and out."""

from __future__ import annotations

import hashlib
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from mlforce import campaign
from mlforce.device import set_threads, task_threads


def _log(msg: str) -> None:
    try:
        get_run_logger().info(msg)
    except Exception:  # outside a run context
        print(msg, flush=True)


@task(name="seed", cache_policy=NO_CACHE)
def seed_task(run_dir: str) -> dict[str, Any]:
    return campaign.label_seed(_run(run_dir))


@task(name="seed-frames", cache_policy=NO_CACHE)
def seed_file_task(run_dir: str) -> tuple[str, int] | None:
    return campaign.seed_file(_run(run_dir))


@task(name="check-frames", cache_policy=NO_CACHE)
def check_task(run_dir: str) -> str | None:
    return campaign.check_file(_run(run_dir))


@task(name="train", cache_policy=NO_CACHE)
def train_task(run_dir: str, round_: int, final: bool = False) -> dict[str, Any]:
    return campaign.train_round(_run(run_dir), round_, log=_log, final=final)


@task(name="simulate", cache_policy=NO_CACHE, tags=["md"])
def simulate_task(run_dir: str, round_: int, spec: dict[str, Any]) -> dict[str, Any]:
    return campaign.simulate_walker(_run(run_dir), round_, spec)


@task(name="simulate-lockstep", cache_policy=NO_CACHE, tags=["md"])
def simulate_lockstep_task(run_dir: str, round_: int, specs: list[dict[str, Any]]) -> list[dict]:
    return campaign.simulate_walkers(_run(run_dir), round_, specs)


@task(name="select", cache_policy=NO_CACHE)
def select_task(run_dir: str, round_: int, candidate_files: list[str]) -> dict[str, Any]:
    return campaign.select_frames(_run(run_dir), round_, candidate_files)


def label_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Same ledger, same structure, same reference settings: the same label."""
    from ase.io import read

    from mlforce.calculators.reference import reference_description
    from mlforce.store import LabelStore, structure_hash

    run = campaign.RunDir(_path(parameters["run_dir"]))
    frame = read(parameters["selected_file"], parameters["index"])
    return "-".join(
        [
            "label",
            LabelStore(run.ledger).ledger_id,
            structure_hash(frame),
            hashlib.sha256(reference_description(run.config().reference).encode()).hexdigest(),
        ]
    )


# Retries with backoff cover failures around the reference (a locked ledger, a dying worker);
# the reference's own failures are retried inside and recorded as `failed` rows, not raised.
@task(
    name="label",
    retries=3,
    retry_delay_seconds=[1, 5, 20],
    cache_key_fn=label_cache_key,
    persist_result=True,
)
def label_task(run_dir: str, selected_file: str, index: int) -> dict[str, Any]:
    return campaign.label_frame(_run(run_dir), selected_file, index)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(
    run_dir: str, round_: int, train: dict, walkers: list[dict], labels: list[dict]
) -> dict[str, Any]:
    return campaign.evaluate_round(_run(run_dir), round_, train, walkers, labels)


def _path(p: str):
    from pathlib import Path

    return Path(p)


def _run(run_dir: str) -> campaign.RunDir:
    """The run directory, with this task's thread count set from its config's runner."""
    run = campaign.RunDir(_path(run_dir))
    r = run.config().runner
    set_threads(task_threads(r.workers, r.threads))
    return run
