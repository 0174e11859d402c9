"""The steps of an active-learning campaign as plain functions over a run directory.

The Prefect flow (``flows/active_learning.py``) only orders these steps and maps them over
walkers and frames; every step takes and returns paths and JSON-able values.

Run directory::

    RUN/config.yaml            the resolved config of the campaign (a snapshot)
    RUN/state.json             finished rounds with their metrics; the resume point
    RUN/labels.db              the label ledger (ASE db)
    RUN/round_NNN/model.pt     the round's checkpoint
    RUN/round_NNN/walker_W.extxyz, candidates_W.extxyz, selected.extxyz
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from mlforce.config import Config, config_from_dict
from mlforce.errors import ConfigError, MlforceError, ReferenceFailure

Logger = Callable[[str], None]
STATE = "state.json"
LOCK = ".lock"
CONFIG = "config.yaml"
LEDGER = "labels.db"


# --- run directory ----------------------------------------------------------------------------


def config_hash(config: Config) -> str:
    """Hash of the resolved config; a run directory only resumes with the same one."""
    text = json.dumps(config.model_dump(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class RunDir:
    """Paths and state of one campaign."""

    root: Path

    @property
    def ledger(self) -> Path:
        return self.root / LEDGER

    def round_dir(self, round_: int) -> Path:
        path = self.root / f"round_{round_:03d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def checkpoint(self, round_: int) -> Path:
        return self.root / f"round_{round_:03d}" / "model.pt"

    def config(self) -> Config:
        return config_from_dict(yaml.safe_load((self.root / CONFIG).read_text()), str(self.root))

    def state(self) -> dict[str, Any]:
        path = self.root / STATE
        return json.loads(path.read_text()) if path.is_file() else {"rounds": []}

    def write_state(self, state: dict[str, Any]) -> None:
        tmp = self.root / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.root / STATE)


def check_campaign(config: Config) -> None:
    """Whole-config checks that need the structures: every start structure reads, and the
    reference accepts it (e.g. PySCF refuses periodic cells). Run before anything starts."""
    from mlforce.calculators.reference import build_reference, validate_reference
    from mlforce.md import load_start_structure

    validate_reference(config.reference)
    for path in config.md.structures:
        atoms = load_start_structure(path)
        try:
            build_reference(config.reference, atoms)
        except ConfigError as err:
            raise ConfigError(f"md.structures {path}: {err}") from None


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold the run directory for one campaign at a time (an exclusive ``flock`` on RUN/.lock).

    A second holder gets one clear error naming the first one's PID and host. The kernel drops
    the lock when its process ends however it ends (kill -9 included), so a lock file left by a
    dead process is taken over without any guessing from its contents. (``flock`` is local to
    a host on some network file systems: run one campaign per directory there yourself.)
    """
    import fcntl
    import socket

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    handle = open(path, "a+")  # closed below, or by the kernel with the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise MlforceError(
            f"{root} is in use by {holder}; wait for it to end or use another run directory"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(
        f"PID {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    handle.flush()
    try:
        yield path
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_resumable(config: Config, run_dir: str | Path, force: bool = False) -> None:
    """Refuse a run directory made by a different config (unless ``force``)."""
    root = Path(run_dir)
    if (root / STATE).is_file() and not force:
        state = RunDir(root).state()
        digest = config_hash(config)
        if state.get("config_hash") != digest and not _same_as_snapshot(root, digest):
            raise ConfigError(
                f"{root} was created by a different config (hash {state.get('config_hash')}, "
                f"this one {digest}); use another run directory, or --force to resume anyway"
            )


def _same_as_snapshot(root: Path, digest: str) -> bool:
    """True when the run's config snapshot, read by this version of mlforce, is ``digest``'s
    config: the stored hash differs only because a newer mlforce added settings with
    defaults (an upgrade in the middle of a campaign), not because the user changed one."""
    try:
        snapshot = yaml.safe_load((root / CONFIG).read_text())
        return config_hash(config_from_dict(snapshot, str(root / CONFIG))) == digest
    except (OSError, yaml.YAMLError, ConfigError):
        return False


def prepare_run_dir(config: Config, run_dir: str | Path, force: bool = False) -> RunDir:
    """Create or reopen a run directory; refuse one made by a different config unless forced."""
    root = Path(run_dir)
    run = RunDir(root)
    digest = config_hash(config)
    check_resumable(config, root, force)
    root.mkdir(parents=True, exist_ok=True)
    (root / CONFIG).write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    state = run.state()
    state["config_hash"] = digest
    run.write_state(state)
    return run


# --- seed -------------------------------------------------------------------------------------


def seed_frames(config: Config) -> list[Atoms]:
    """Seed structures: labelled (source md: the reference MD's own frames; source file), or
    unlabelled (source rattle)."""
    from mlforce.data import read_labelled
    from mlforce.generate import reference_md
    from mlforce.md import load_start_structure

    seed = config.active_learning.seed
    if seed.source == "file":
        if not seed.file:
            raise ConfigError("active_learning.seed.file is required for source: file")
        return read_labelled(seed.file)
    frames: list[Atoms] = []
    for k, path in enumerate(config.md.structures):
        start = load_start_structure(path)
        if seed.source == "rattle":
            rng = np.random.default_rng(config.md.seed + k)
            for _ in range(seed.frames):
                frame = start.copy()
                frame.positions += rng.normal(scale=seed.rattle_std, size=frame.positions.shape)
                frames.append(frame)
        else:
            gen = config.data.generate.model_copy(
                update={"interval": seed.interval, "equilibration_steps": seed.interval}
            )
            driver = seed.sampler or config.reference
            try:
                md_frames = reference_md(
                    start, driver, seed.temperature, seed.frames, gen, config.md.seed + k
                )
            except MlforceError:
                raise
            except Exception as err:
                which = "active_learning.seed.sampler" if seed.sampler else "the reference"
                raise MlforceError(
                    f"seed MD with {which} failed on {path} ({err}); "
                    "set active_learning.seed.source: rattle to seed without reference MD"
                ) from None
            if seed.sampler is not None:  # the sampler's labels are not the reference's: drop
                for frame in md_frames:
                    clean = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc)
                    clean.info.update(walker=k, md_step=int(frame.info["md_step"]))
                    frames.append(clean)
            else:
                frames += md_frames  # already labelled by the reference MD: no second call
    return frames


SEED_FILE = "seed_frames.extxyz"
CHECK_FILE = "check_frames.extxyz"
CHECK_SEED_OFFSET = 100_003  # the check MD's random seed: md.seed + this (+ structure index)


CHECK_ATTEMPTS = 3  # tries of the check's MD (new velocities each) before it is given up


def check_frames(config: Config) -> list[Atoms]:
    """The accuracy check's frames (``active_learning.check``), labelled by the reference:
    per start structure, a reference MD at the seed's temperature (driven by the seed's cheaper
    ``sampler`` if it has one, whose frames the reference then labels, each call retried like
    a label) with another random seed and ``check.interval`` steps between frames. An MD that
    fails starts again with new velocities, :data:`CHECK_ATTEMPTS` times in all; then the
    last error is raised."""
    from mlforce.generate import reference_md
    from mlforce.labeling import run_with_retries
    from mlforce.md import load_start_structure

    al = config.active_learning
    check = al.check
    if check is None:
        return []
    gen = config.data.generate.model_copy(
        update={"interval": check.interval, "equilibration_steps": check.interval}
    )
    temperature = check.temperature or al.seed.temperature
    driver = al.seed.sampler or config.reference
    frames: list[Atoms] = []
    for k, path in enumerate(config.md.structures):
        start = load_start_structure(path)
        for attempt in range(CHECK_ATTEMPTS):
            seed = config.md.seed + CHECK_SEED_OFFSET + 7919 * attempt + k
            try:
                md = reference_md(start, driver, temperature, check.frames, gen, seed)
                break
            except Exception:
                if attempt == CHECK_ATTEMPTS - 1:
                    raise
        for frame in md:
            if al.seed.sampler is not None:  # the sampler's labels are not the reference's
                clean = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc)
                outcome = run_with_retries(clean, config.reference)
                if outcome.result is None:
                    raise ReferenceFailure(outcome.error or "reference failed")
                clean.calc = SinglePointCalculator(
                    clean, energy=outcome.result.energy, forces=outcome.result.forces
                )
                clean.info.update(frame.info)
                frame = clean
            frame.info.update(trigger="check", walker=k)
            frames.append(frame)
    return frames


def check_file(run: RunDir) -> str | None:
    """RUN/check_frames.extxyz (None without ``active_learning.check``): made once
    (atomically) and re-read on resume, so every round is scored on the same frames. A
    reference that fails the check's MD does not fail the campaign: None, and the campaign
    stops by its trigger rate alone, saying so."""
    if run.config().active_learning.check is None:
        return None
    path = run.root / CHECK_FILE
    if not path.is_file():
        try:
            frames = check_frames(run.config())
        except Exception as err:  # a failing reference, whatever it raised
            return f"unavailable: {' '.join(str(err).split())[:200] or type(err).__name__}"
        tmp = path.with_suffix(".tmp.extxyz")
        write(tmp, frames, format="extxyz")
        os.replace(tmp, path)
    return str(path)


def seed_file(run: RunDir) -> tuple[str, int] | None:
    """The unlabelled seed frames as RUN/seed_frames.extxyz, for labelling in parallel tasks.

    For ``source: rattle`` and for ``source: md`` with a ``sampler``; None for the seeds that
    come labelled (the reference's own MD, a file). Written once (atomically) and re-read on
    resume, so a resumed campaign labels exactly the same frames and skips the finished ones.
    Each frame carries its provenance (round 0, trigger ``seed``). Returns (path, frames).
    """
    seed = run.config().active_learning.seed
    if seed.source == "file" or (seed.source == "md" and seed.sampler is None):
        return None
    path = run.root / SEED_FILE
    if not path.is_file():
        frames = seed_frames(run.config())
        for frame in frames:
            frame.info.update(iteration=0, trigger="seed")
        tmp = path.with_suffix(".tmp.extxyz")
        write(tmp, frames, format="extxyz")
        os.replace(tmp, path)
    return str(path), len(read(path, ":"))


# --- train ------------------------------------------------------------------------------------


def round_config(config: Config, warm: bool, final: bool = False) -> Config:
    """The training settings of a round: as configured from scratch (round 1); warm-started
    rounds train ``active_learning.round_epochs`` epochs without warm-up (when it is set), the
    final model ``active_learning.final_epochs`` (when set; ``final``).
    The benchmarks that replay the schedule use this too, so that it is the same."""
    al = config.active_learning
    epochs = (al.final_epochs if final else None) or al.round_epochs
    if not warm or not epochs:
        return config
    config = config.model_copy(deep=True)
    config.training.max_epochs = epochs
    config.training.warmup_epochs = 0
    return config


def train_round(
    run: RunDir, round_: int, log: Logger | None = None, final: bool = False
) -> dict[str, Any]:
    """Train on every ok label of the ledger (warm start after round 1); write the checkpoint.

    ``final``: the model the campaign hands over (``active_learning.final_epochs``)."""
    from mlforce.checkpoint import load_checkpoint, save_checkpoint
    from mlforce.store import LabelStore
    from mlforce.train import train_models

    config = run.config()
    al = config.active_learning
    store = LabelStore(run.ledger)
    train, val = store.split(al.val_fraction)
    if len(val) == 0 and len(train) > 1:
        val, train = train[-1:], train[:-1]
    if not train:
        raise MlforceError(f"{run.ledger}: no ok labels to train on")
    warm = None
    if round_ > 1 and run.checkpoint(round_ - 1).is_file():
        warm = load_checkpoint(run.checkpoint(round_ - 1)).models
    config = round_config(config, warm is not None, final)
    result = train_models(train, val, config, warm_start=warm, log=log or (lambda m: None))
    path = save_checkpoint(
        run.checkpoint(round_),
        result.models,
        calibration=result.calibration,
        latent=result.latent,
        metadata={"round": round_, "training": result.metrics, "config": config.model_dump()},
    )
    return {
        "checkpoint": str(path),
        "n_train": len(train),
        "n_val": len(val),
        "val_force_mae": result.metrics["val_force_mae"],
        "val_energy_mae_per_atom": result.metrics["val_energy_mae_per_atom"],
        "train_seconds": result.metrics["seconds"],
        "calibration_scale": result.calibration.get("scale"),
    }


# --- simulate ---------------------------------------------------------------------------------


def walker_specs(config: Config) -> list[dict[str, Any]]:
    """``md.replicas`` walkers per structure x temperature: JSON-able specs."""
    specs = []
    for s, structure in enumerate(config.md.structures):
        for t, temperature in enumerate(config.md.temperatures):
            for r in range(config.md.replicas):
                specs.append(
                    {"walker": len(specs), "structure": structure, "temperature": temperature,
                     "structure_index": s, "temperature_index": t, "replica": r}
                )  # fmt: skip
    return specs


def walker_start(run: RunDir, round_: int, spec: dict[str, Any]) -> Atoms:
    """Where a walker of round ``round_`` starts (``md.start``).

    ``structure``: its start structure. ``labelled``: the positions of an ok label of an earlier
    round (seed labels included) with the same composition, drawn with a generator seeded by
    ``md.seed``, the round and the walker (labels in structure-hash order, so the draw does not
    depend on the order parallel workers wrote them); the start structure when there is none.
    ``continue``: the last frame of the same walker's trajectory in round ``round_ - 1`` that
    no guard or rollback rejected (positions only: the walker draws new velocities at its
    temperature); the start structure in round 1 or when there is none.
    """
    from mlforce.md import load_start_structure
    from mlforce.store import LabelStore

    config = run.config()
    atoms = load_start_structure(spec["structure"])
    if config.md.start == "continue":
        return _walker_end(run, round_ - 1, spec["walker"], atoms)
    if config.md.start == "structure" or not run.ledger.exists():
        return atoms
    formula = atoms.get_chemical_formula()
    frames = sorted(
        (a for a in LabelStore(run.ledger).atoms(status="ok", selection=f"iteration<{round_}")
         if a.get_chemical_formula() == formula),
        key=lambda a: a.info["structure_hash"],
    )  # fmt: skip
    if not frames:
        return atoms
    rng = np.random.default_rng([config.md.seed, round_, spec["walker"]])
    chosen = frames[int(rng.integers(len(frames)))]
    return Atoms(chosen.numbers, positions=chosen.positions, cell=chosen.cell, pbc=chosen.pbc)


def _walker_end(run: RunDir, round_: int, walker: int, start: Atoms) -> Atoms:
    """Where walker ``walker`` of round ``round_`` ended: its trajectory's last frame that no
    guard or rollback rejected, with ``start``'s composition; ``start`` itself when none is."""
    path = run.round_dir(round_) / f"walker_{walker}.extxyz" if round_ >= 1 else None
    if path is None or not path.is_file():
        return start
    for frame in reversed(read(path, ":")):
        decision = str(frame.info.get("decision", ""))
        rejected = decision.startswith("guard") or decision == "rollback"
        if not rejected and np.array_equal(frame.numbers, start.numbers):
            return Atoms(frame.numbers, positions=frame.positions, cell=frame.cell, pbc=frame.pbc)
    return start


def use_lockstep(config: Config) -> bool:
    """Whether the round's walkers run in lock-step (``md.lockstep``; auto = on CUDA)."""
    from mlforce.device import resolve_device

    if config.md.lockstep == "auto":
        return resolve_device(config.device).type == "cuda"
    return config.md.lockstep == "on"


def bias_strength(config: Config, round_: int, temperature: float) -> float:
    """The latent bias's A (eV) for a walker at ``temperature`` (K) in round ``round_``: 0 when
    ``md.bias`` is off, its rounds are over, or it leaves that temperature's walkers alone."""
    bias = config.md.bias
    return bias.strength if bias is not None and bias.active(round_, temperature) else 0.0


def _walker_setup(run: RunDir, round_: int) -> tuple[Config, Any, Any, str]:
    from mlforce.calculators.ml import MLForceCalculator
    from mlforce.checkpoint import checkpoint_hash

    config = run.config()
    md = config.md.model_copy(deep=True)
    md.triggers.mode = "collect"
    u = config.uncertainty
    bias = config.md.bias if config.md.bias and config.md.bias.active(round_) else None
    calc = MLForceCalculator(
        run.checkpoint(round_), device=config.device, mc_samples=u.mc_samples, seed=u.seed,
        prediction=u.prediction, bias_strength=bias.strength if bias else 0.0,
        bias_width=bias.width if bias else 1.0,
    )  # fmt: skip
    return config, md, calc, "m-" + checkpoint_hash(run.checkpoint(round_))


def _walker_result(run: RunDir, round_: int, spec: dict, summary: Any, candidates: list) -> dict:
    path = run.round_dir(round_) / f"candidates_{spec['walker']}.extxyz"
    write(path, candidates, format="extxyz")
    return {**summary.to_dict(), "candidates_file": str(path), "structure": spec["structure"]}


def simulate_walker(run: RunDir, round_: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one walker in collect mode with the round's model; write its candidates."""
    from mlforce.md import run_walker

    config, md, calc, model_hash = _walker_setup(run, round_)
    walker = spec["walker"]
    calc.sample_index = walker  # prediction "sample": each walker its own posterior sample
    calc.bias_strength = bias_strength(config, round_, spec["temperature"])
    candidates: list[Atoms] = []
    summary = run_walker(
        calc,
        walker_start(run, round_, spec),
        spec["temperature"],
        md,
        seed=md.seed + 1000 * round_ + walker,
        walker=walker,
        iteration=round_,
        model_hash=model_hash,
        trajectory=run.round_dir(round_) / f"walker_{walker}.extxyz",
        candidates=candidates,
    )
    return _walker_result(run, round_, spec, summary, candidates)


def simulate_walkers(run: RunDir, round_: int, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All walkers of a round in lock-step (one batched model call per MD step).

    Same seeds and outputs as :func:`simulate_walker` for each spec, one after the other.
    """
    from mlforce.lockstep import run_walkers

    config, md, calc, model_hash = _walker_setup(run, round_)
    candidates: list[list[Atoms]] = [[] for _ in specs]
    per_walker = [
        {"walker": s["walker"], "candidates": c,
         "trajectory": run.round_dir(round_) / f"walker_{s['walker']}.extxyz"}
        for s, c in zip(specs, candidates, strict=True)
    ]  # fmt: skip
    starts = [walker_start(run, round_, s) for s in specs]
    temperatures = [s["temperature"] for s in specs]
    seeds = [md.seed + 1000 * round_ + s["walker"] for s in specs]
    strengths = [bias_strength(config, round_, t) for t in temperatures]
    summaries = run_walkers(calc, starts, temperatures, md, seeds, per_walker=per_walker,
                            bias_strengths=strengths, iteration=round_,
                            model_hash=model_hash)  # fmt: skip
    for summary in summaries:  # the walkers shared every batched call: each pays 1/n of it
        summary.model_seconds /= len(specs)
    return [
        _walker_result(run, round_, s, summary, c)
        for s, summary, c in zip(specs, summaries, candidates, strict=True)
    ]


# --- select -----------------------------------------------------------------------------------


def _new_frames(paths: list[str | Path], known: Any, seen: set[str]) -> list[Atoms]:
    """Frames of these extxyz files whose structures are neither labelled nor already seen."""
    from mlforce.store import structure_hash

    out: list[Atoms] = []
    for path in paths:
        if not Path(path).is_file() or Path(path).stat().st_size == 0:
            continue
        for frame in read(path, ":"):
            h = structure_hash(frame)
            if h in known or h in seen:
                continue
            seen.add(h)
            out.append(frame)
    return out


def learned_descriptors(checkpoint: str | Path, frames: list[Atoms]) -> np.ndarray:
    """(N, S * F) per-structure descriptors from a checkpoint's own features (first member)."""
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.latent import atom_features
    from mlforce.selection import pooled_descriptor

    ckpt = load_checkpoint(checkpoint)
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, False)
    return np.array(
        [
            pooled_descriptor(f, g.numbers.numpy(), ckpt.species)
            for f, g in zip(atom_features(ckpt.model, graphs), graphs)
        ]
    )


def latent_novelty(
    checkpoint: str | Path, frames: list[Atoms], labelled: list[Atoms]
) -> np.ndarray:
    """(N,) each frame's distance to the labelled atoms in a checkpoint's own features
    (:func:`mlforce.latent.structure_novelty`, 3 Å neighbourhoods)."""
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.latent import structure_novelty

    ckpt = load_checkpoint(checkpoint)
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, False)
    known = graphs_from_frames(labelled, ckpt.species, ckpt.cutoff, dtype, False)
    return structure_novelty(ckpt.model, graphs, known)


def rescore_sigma(checkpoint: str | Path, frames: list[Atoms], samples: int, seed: int) -> None:
    """Re-score frames' ``max_force_std`` (calibrated, eV/Å) with ``samples`` MC masks, in place.

    The walkers check σ with few samples (``uncertainty.mc_samples``) and the same masks at
    every check: a noisy estimate of the model's uncertainty at one frame (within a round's
    flagged frames it ranked the true error with Spearman 0.23 where 64 fresh masks gave
    0.52, docs/benchmarks.md 16). The few selected frames are cheap to re-score, so the
    ledger records the better estimate, calibrated (``max_force_std``) and raw
    (``max_force_std_raw``); the walker's value is kept as ``trigger_max_force_std``. A
    committee's σ has no sampling noise: left as it is.
    """
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.uncertainty import predict_dataset

    ckpt = load_checkpoint(checkpoint)
    if ckpt.is_ensemble or not frames or not ckpt.model.has_dropout:
        return
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(frames, ckpt.species, ckpt.cutoff, dtype, False)
    pred = predict_dataset(
        ckpt.models, graphs, samples, seed, local_radius=ckpt.local_radius, latent=ckpt.latent
    )
    calibrated, raw = pred.max_force_std(ckpt.calibration), pred.max_force_std()
    for frame, value, value_raw in zip(frames, calibrated, raw):
        if "max_force_std" in frame.info:
            frame.info["trigger_max_force_std"] = float(frame.info["max_force_std"])
        frame.info["max_force_std"] = float(value)
        frame.info["max_force_std_raw"] = float(value_raw)


def select_frames(run: RunDir, round_: int, candidate_files: list[str]) -> dict[str, Any]:
    """Deduplicate candidates, drop labelled ones, choose a batch within the budget.

    Audit frames are all kept (they measure the model where it is confident). The rest follows
    ``active_learning.selection``, by the σ the walkers measured; the chosen frames' σ is then
    re-scored with ``uncertainty.label_samples`` masks for the record (:func:`rescore_sigma`;
    choosing by the re-scored σ took worse frames, docs/benchmarks.md 16):

    * ``uncertainty``: among the frames the walkers flagged (σ above the threshold), the budget
      shared evenly between walkers, and within each walker k-means in the round model's
      learned features with one cluster per label, the most uncertain typical frame of each
      cluster (:func:`mlforce.selection.stratified_selection`);
    * ``uncertainty_fps``: the highest σ first, then farthest-point sampling on sorted inverse
      distances;
    * ``random``: as many frames as ``uncertainty`` would take, drawn uniformly from every frame
      the walkers visited (their trajectories; guard frames excepted): the baseline that
      asks whether σ chooses better than chance among the same kind of frames.
    """
    from mlforce.selection import (
        distance_descriptor,
        farthest_point_selection,
        random_selection,
        stratified_selection,
    )
    from mlforce.store import LabelStore, structure_hash

    config = run.config()
    al = config.active_learning
    store = LabelStore(run.ledger)
    known = store.hashes()
    seen: set[str] = set()
    pool = _new_frames(candidate_files, known, seen)
    remaining = max(0, al.total_label_budget - len(store))
    # a round redone after a kill during its labelling already holds some of its labels
    done_this_round = len(store.rows(iteration=round_))
    budget = max(0, min(al.labels_per_round - done_this_round, remaining))
    audits = [f for f in pool if f.info.get("trigger") == "audit"][:budget]
    others = [f for f in pool if f.info.get("trigger") != "audit"]
    wanted = min(budget - len(audits), len(others))
    sigma = [float(f.info.get("max_force_std", 0.0)) for f in others]
    seed = config.md.seed + 7919 * round_
    if al.selection == "random":
        visited = _visited_frames(run, round_, known, {structure_hash(a) for a in audits})
        picked = [visited[i] for i in random_selection(len(visited), wanted, seed)]
        for frame in picked:
            frame.info.update(trigger="random", iteration=round_)
        selected = audits + picked
    elif al.selection == "uncertainty_fps":
        descriptors = [distance_descriptor(f) for f in others]
        chosen = farthest_point_selection(descriptors, sigma, wanted)
        selected = audits + [others[i] for i in chosen]
    else:
        descriptors = learned_descriptors(run.checkpoint(round_), others) if others else []
        walkers = [int(f.info.get("walker", 0)) for f in others]
        scores = sigma
        if al.selection == "uncertainty_latent" and others:
            novelty = latent_novelty(run.checkpoint(round_), others, store.atoms(status="ok"))
            scores = list(np.sqrt(np.maximum(sigma, 0.0) * novelty))
        chosen = stratified_selection(descriptors, scores, walkers, wanted, seed)
        selected = audits + [others[i] for i in chosen]
        short = budget - len(selected)
        before = [r for r in run.state().get("rounds", []) if r["round"] < round_]
        if short > 0 and convergence_note(before, config):
            selected += _top_up(run, round_, known, seen, short, seed + 1)
    samples = config.uncertainty.label_samples
    if samples:
        rescore_sigma(run.checkpoint(round_), selected, samples,
                      config.uncertainty.seed + 1 + round_)  # fmt: skip
    path = run.round_dir(round_) / "selected.extxyz"
    write(path, selected, format="extxyz")
    return {"selected_file": str(path), "n_candidates": len(pool), "n_selected": len(selected)}


def _visited_frames(
    run: RunDir, round_: int, known: Any, taken: set[str], keep_sigma: bool = False
) -> list[Atoms]:
    """Frames the round's walkers visited (their trajectories), neither labelled nor in
    ``taken``; start frames and guard frames excepted. ``info``: md_step, walker, time_fs and,
    with ``keep_sigma``, the walker's ``max_force_std`` (checked frames only)."""
    visited: list[Atoms] = []
    for path in sorted(run.round_dir(round_).glob("walker_*.extxyz")):
        for frame in _new_frames([path], known, taken):
            step = int(frame.info.get("md_step", 0))
            if step > 0 and not str(frame.info.get("decision", "")).startswith("guard"):
                walker = int(path.stem.removeprefix("walker_"))
                sigma = float(frame.info.get("max_force_std", float("nan")))
                frame.info = {"md_step": frame.info.get("md_step"), "walker": walker,
                              "time_fs": frame.info.get("time_fs")}  # fmt: skip
                if keep_sigma and np.isfinite(sigma):
                    frame.info["max_force_std"] = sigma
                visited.append(frame)
    return visited


def _top_up(
    run: RunDir, round_: int, known: Any, taken: set[str], count: int, seed: int
) -> list[Atoms]:
    """``count`` more frames for a round whose campaign is quiet but not yet accurate
    (:func:`convergence_note`): the walkers flag too little to teach the model, so the round
    fills its budget from the frames they visited, chosen as the flagged ones are (k-means in
    the model's features per walker, the most uncertain typical frame of each cluster), with
    the round model's forces kept for the true error. ``trigger``: ``top_up``."""
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames
    from mlforce.evaluate import predict_graphs
    from mlforce.selection import stratified_selection

    pool = [f for f in _visited_frames(run, round_, known, taken, keep_sigma=True)
            if "max_force_std" in f.info]  # fmt: skip
    if not pool:
        return []
    descriptors = learned_descriptors(run.checkpoint(round_), pool)
    sigma = [f.info["max_force_std"] for f in pool]
    walkers = [f.info["walker"] for f in pool]
    picked = [pool[i] for i in stratified_selection(descriptors, sigma, walkers, count, seed)]
    ckpt = load_checkpoint(run.checkpoint(round_))
    dtype = next(ckpt.model.parameters()).dtype
    graphs = graphs_from_frames(picked, ckpt.species, ckpt.cutoff, dtype, False)
    members = [predict_graphs(m, graphs)[1] for m in ckpt.models]  # a committee: the mean
    for k, frame in enumerate(picked):
        forces = np.mean([member[k] for member in members], axis=0)
        frame.info.update(trigger="top_up", iteration=round_)
        frame.arrays["model_forces"] = forces
    return picked


def label_frame(run: RunDir, selected_file: str, index: int) -> dict[str, Any]:
    """Label one selected frame (the reference, with retries inside); returns its outcome."""
    from mlforce.labeling import label
    from mlforce.store import PROVENANCE_KEYS, LabelStore

    config = run.config()
    frame = read(selected_file, index)
    prov = {k: frame.info[k] for k in PROVENANCE_KEYS if k in frame.info}
    forces = frame.arrays.get("model_forces")
    clean = Atoms(frame.numbers, frame.positions, cell=frame.cell, pbc=frame.pbc)
    summary = label([clean], config.reference, LabelStore(run.ledger), prov, [forces],
                    progress=False)  # fmt: skip
    return summary.to_dict()


def label_seed(run: RunDir, frames: list[Atoms] | None = None) -> dict[str, Any]:
    """Label the seed (trigger ``seed``, round 0) into the ledger; resumable.

    ``source: md``: the reference MD of :func:`seed_md` (every snapshot stored as it comes,
    so a killed campaign resumes the MD instead of repeating it). ``rattle``: the displaced
    frames are labelled like any others (already labelled ones are skipped). ``file``: the
    given labels are stored. ``frames``: the seed frames (default :func:`seed_frames`;
    ignored for ``md``).
    """
    from mlforce.labeling import label
    from mlforce.store import LabelStore

    config = run.config()
    store = LabelStore(run.ledger)
    prov = {"iteration": 0, "trigger": "seed"}
    if config.active_learning.seed.source == "md" and config.active_learning.seed.sampler is None:
        return seed_md(run)
    frames = seed_frames(config) if frames is None else frames
    if config.active_learning.seed.source == "file":
        from mlforce.graph import reference_labels

        for atoms in frames:
            e, f = reference_labels(atoms)
            clean = Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
            store.add(clean, energy=e, forces=f, reference="file", status="ok", **prov)
        return {"ok": len(frames), "failed": 0, "skipped": 0, "reference_seconds": 0.0}
    return label(frames, config.reference, store, prov, progress=False).to_dict()


SEED_SEGMENT_ATTEMPTS = 3  # tries of one seed-MD segment before the campaign gives up


def seed_md(run: RunDir) -> dict[str, Any]:
    """The seed's reference MD, one walker per start structure, resumable step by step.

    Every snapshot goes into the ledger the moment it exists (provenance ``walker`` = the
    structure's index, ``md_step``), and after every MD step its state (positions, momenta,
    the reference energy and forces) replaces RUN/seed_md_K.json. A campaign killed during
    its seed continues each structure's MD from that state: no finished reference call is
    made again. Every call is retried like a label
    (:class:`mlforce.labeling.RetryingReference`); a segment that still fails restarts from
    the last state with new velocities, up to :data:`SEED_SEGMENT_ATTEMPTS` times.
    """
    from mlforce.calculators.reference import reference_description
    from mlforce.generate import reference_md_frames
    from mlforce.labeling import RetryingReference
    from mlforce.md import load_start_structure
    from mlforce.store import LabelStore

    config = run.config()
    seed = config.active_learning.seed
    store = LabelStore(run.ledger)
    gen = config.data.generate.model_copy(
        update={"interval": seed.interval, "equilibration_steps": seed.interval}
    )
    added, t0, retries = 0, time.perf_counter(), 0
    for k, path in enumerate(config.md.structures):
        start = load_start_structure(path)
        method = reference_description(config.reference, start)
        state_file = run.root / f"seed_md_{k}.json"

        def save_state(atoms: Atoms, step: int, state_file: Path = state_file) -> None:
            results = atoms.calc.results
            state = {"md_step": step, "positions": atoms.positions.tolist(),
                     "momenta": atoms.get_momenta().tolist(), "energy": results["energy"],
                     "forces": np.asarray(results["forces"]).tolist()}  # fmt: skip
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_file)

        failures: list[str] = []
        while True:
            have = len(store.rows(trigger="seed", walker=k, status="ok"))
            if have >= seed.frames:
                break
            calc = RetryingReference(config.reference)
            frame, resume = start, {}
            saved = json.loads(state_file.read_text()) if state_file.is_file() else None
            if saved is not None:  # continue where the last run stopped, its forces known
                frame = start.copy()
                frame.positions = np.array(saved["positions"])
                calc.atoms = frame.copy()
                calc.results = {"energy": saved["energy"], "forces": np.array(saved["forces"])}
                momenta = None if failures else np.array(saved["momenta"])
                resume = {"first_step": int(saved["md_step"]), "momenta": momenta}
            rng_seed: int | list[int] = config.md.seed + k  # an uninterrupted seed: the classic
            if saved is not None:
                rng_seed = [config.md.seed + k, int(saved["md_step"]), len(failures)]
            try:
                for snap in reference_md_frames(
                    frame, calc, seed.temperature, seed.frames - have, gen, rng_seed,
                    on_step=save_state, **resume,
                ):  # fmt: skip
                    e, f = float(snap.get_potential_energy()), snap.get_forces()
                    step = int(snap.info["md_step"])
                    clean = Atoms(snap.numbers, snap.positions, cell=snap.cell, pbc=snap.pbc)
                    store.add(clean, energy=e, forces=f, reference=method, status="ok",
                              iteration=0, trigger="seed", walker=k, md_step=step,
                              time_fs=step * gen.timestep_fs)  # fmt: skip
                    added += 1
            except MlforceError as err:
                failures.append(str(err))
                if len(failures) >= SEED_SEGMENT_ATTEMPTS:
                    raise MlforceError(
                        f"seed MD with the reference failed on {path} "
                        f"{len(failures)} times ({failures[-1]}); set "
                        "active_learning.seed.source: rattle to seed without reference MD"
                    ) from None
            finally:
                retries += calc.retries_used
    total = len(store.rows(trigger="seed", status="ok"))
    seconds = time.perf_counter() - t0
    return {"ok": total, "failed": 0, "skipped": total - added, "reference_seconds": seconds,
            "retries": retries}  # fmt: skip


# --- evaluate and converge --------------------------------------------------------------------


def evaluate_round(
    run: RunDir, round_: int, train: dict, walkers: list[dict], labels: list[dict]
) -> dict[str, Any]:
    """The round's row: labels, errors, trigger rate, σ statistics, times."""
    from mlforce.store import LabelStore

    config = run.config()
    store = LabelStore(run.ledger)
    rows = store.rows(iteration=round_)
    audit = [r["true_max_force_error"] for r in rows
             if r.get("trigger") == "audit" and "true_max_force_error" in r]  # fmt: skip
    simulated_ps = sum(w["simulated_fs"] for w in walkers) / 1000.0
    triggers = sum(w["triggers_per_ps"] * w["simulated_fs"] / 1000.0 for w in walkers)
    row = {
        "round": round_,
        "labels_added": sum(x.get("ok", 0) for x in labels),
        "labels_failed": sum(x.get("failed", 0) for x in labels),
        "labels_total": len(store.rows(status="ok")),
        "val_force_mae": train["val_force_mae"],
        "audit_max_force_error": float(np.mean(audit)) if audit else None,
        "audits": len(audit),
        "triggers_per_ps": triggers / simulated_ps if simulated_ps else 0.0,
        "sigma_mean": float(np.mean([w["sigma_mean"] for w in walkers])) if walkers else 0.0,
        "sigma_max": float(np.max([w["sigma_max"] for w in walkers])) if walkers else 0.0,
        "simulated_ps": simulated_ps,
        "rollbacks": sum(w["rollbacks"] for w in walkers),
        "train_seconds": train["train_seconds"],
        "simulate_seconds": sum(w["model_seconds"] for w in walkers),
        "label_seconds": sum(x.get("reference_seconds", 0.0) for x in labels),
        "checkpoint": train["checkpoint"],
    }
    check = run.root / CHECK_FILE
    if config.active_learning.check is not None and check.is_file():
        row["check_force_mae"] = test_errors(train["checkpoint"], [str(check)])[check.stem]
    if config.active_learning.test_files:
        row["test_force_mae"] = test_errors(train["checkpoint"], config.active_learning.test_files)
    return row


def test_errors(checkpoint: str, files: list[str]) -> dict[str, float]:
    """Deterministic force MAE (eV/Å) of a checkpoint on each labelled test file.

    A committee checkpoint is scored by its members' mean (what its calculator predicts).
    """
    from mlforce.checkpoint import load_checkpoint
    from mlforce.data import graphs_from_frames, read_labelled
    from mlforce.evaluate import evaluate_graphs

    ckpt = load_checkpoint(checkpoint)
    dtype = next(ckpt.model.parameters()).dtype
    out = {}
    for f in files:
        graphs = graphs_from_frames(read_labelled(f), ckpt.species, ckpt.cutoff, dtype, True)
        out[Path(f).stem] = evaluate_graphs(ckpt.models, graphs)["force_mae"]
    return out


def _accuracy_failures(row: dict[str, Any], config: Config) -> list[str]:
    """The accuracy checks the round ``row`` fails (the reference-MD check, the audits)."""
    al = config.active_learning
    failures = []
    error = row.get("check_force_mae")
    if al.check is not None and error is not None and error > al.check.target_force_mae:
        failures.append(
            f"force MAE on the check frames {error:.4f} > {al.check.target_force_mae} eV/Å"
        )
    audit = row.get("audit_max_force_error")
    if al.audit_target is not None and audit is not None and audit > al.audit_target:
        failures.append(
            f"the audits' mean largest force error {audit:.3f} > {al.audit_target} eV/Å"
        )
    return failures


def _quiet(rounds: list[dict[str, Any]], config: Config) -> str | None:
    """The trigger-rate half of the stop rule: its wording if the last rounds were quiet."""
    al = config.active_learning
    k = al.converged_rounds
    recent = rounds[-k:]
    if len(recent) == k and all(r["triggers_per_ps"] < al.target_triggers_per_ps for r in recent):
        return f"trigger rate below {al.target_triggers_per_ps}/ps for {k} rounds"
    return None


def convergence(rounds: list[dict[str, Any]], config: Config) -> str | None:
    """Why the campaign stops after these rounds, or None to go on."""
    al = config.active_learning
    quiet = _quiet(rounds, config)
    if quiet and not _accuracy_failures(rounds[-1], config):
        last = rounds[-1]
        passed, unknown = [], []
        if al.check is not None:
            error = last.get("check_force_mae")
            if error is None:  # its reference MD failed (check_file): the trigger rate alone
                unknown.append("no accuracy check: its reference MD failed")
            else:
                passed.append(
                    f"force MAE on the check frames {error:.4f} <= {al.check.target_force_mae} eV/Å"
                )
        if al.audit_target is not None:
            audit = last.get("audit_max_force_error")
            if audit is None:
                unknown.append("no audits in the last round")
            else:
                passed.append(
                    f"the audits' mean largest force error {audit:.3f} <= {al.audit_target} eV/Å"
                )
        reason = f"converged: {', '.join([quiet, *passed])}"
        return reason + (f" ({'; '.join(unknown)})" if unknown else "")
    if rounds and rounds[-1]["labels_total"] >= al.total_label_budget:
        return f"label budget of {al.total_label_budget} reached"
    if len(rounds) >= al.max_rounds:
        return f"max_rounds ({al.max_rounds}) reached"
    return None


def convergence_note(rounds: list[dict[str, Any]], config: Config) -> str | None:
    """Why a campaign whose trigger rate says "converged" goes on (its checks), else None."""
    quiet = _quiet(rounds, config)
    failures = _accuracy_failures(rounds[-1], config) if quiet else []
    if not failures:
        return None
    return (
        f"{quiet}, but {' and '.join(failures)}: the model is confident and wrong somewhere; "
        "the next round fills its label budget"
    )


def finalize(
    run: RunDir, rounds: list[dict[str, Any]], reason: str, final_model: dict[str, Any]
) -> dict[str, Any]:
    """The campaign's end: stop reason, the final model (trained on every label), numbers."""
    last, first = rounds[-1], rounds[0]
    tests = run.config().active_learning.test_files
    return {
        "stop_reason": reason,
        "rounds_run": len(rounds),
        "final_checkpoint": final_model["checkpoint"],
        "labels_total": final_model["n_train"] + final_model["n_val"],
        "first_triggers_per_ps": first["triggers_per_ps"],
        "last_triggers_per_ps": last["triggers_per_ps"],
        "final_val_force_mae": final_model["val_force_mae"],
        "final_test_force_mae": test_errors(final_model["checkpoint"], tests) if tests else None,
        "final_train_seconds": final_model["train_seconds"],
        "run_dir": str(run.root),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def summary_text(state: dict[str, Any]) -> str:
    """A few lines for the terminal at the end of a campaign."""
    lines = [
        f"campaign stopped: {state.get('stop_reason')}",
        f"run directory:    {state.get('run_dir')}",
        f"final checkpoint: {state.get('final_checkpoint')}",
        f"labels:           {state.get('labels_total')} in {state.get('rounds_run')} rounds",
        f"trigger rate:     {state.get('first_triggers_per_ps', 0):.2f}/ps in round 1 -> "
        f"{state.get('last_triggers_per_ps', 0):.2f}/ps in the last round",
        f"validation force MAE of the final model: {state.get('final_val_force_mae', 0):.4f} eV/Å",
    ]
    for name, mae in (state.get("final_test_force_mae") or {}).items():
        lines.append(f"test force MAE ({name}): {mae:.4f} eV/Å")
    if state.get("report"):
        lines.append(f"report:           {state['report']}")
    return "\n".join(lines)
