"""Device choice: ``auto`` picks CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

import os

import torch

from mlforce.errors import ConfigError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``/``cpu``/``cuda[:k]`` -> a torch device; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def task_threads(workers: int, threads: int | None = None) -> int:
    """Threads for one of ``workers`` concurrent tasks: ``threads``, or an equal share of cores."""
    return threads if threads else max(1, usable_cores() // max(1, workers))


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch and for OpenMP code called from the calling thread.

    ``torch.set_num_threads`` also sets OpenMP's thread count of the calling thread, which
    tblite and PySCF follow. Under ``OMP_WAIT_POLICY=PASSIVE`` (the flow and the tests), two
    threads per task on a 2-core machine made training 2.0x and MD 2.6x slower than one
    (docs/benchmarks.md section 15). The BLAS libraries numpy and SciPy loaded (OpenBLAS: one
    thread per core from import on; PySCF's matrix work runs through them) are capped at ``n``
    too, process-wide.
    """
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(limits=n, user_api="blas")
