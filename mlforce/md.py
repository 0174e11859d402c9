"""Uncertainty-driven molecular dynamics: ASE dynamics that asks the reference when unsure.

One walker = one structure at one temperature, driven with ``dyn.irun(steps)``. After every
step the physical guards look at the frame; every ``check_every`` steps the calibrated
``max_force_std`` of the mlforce calculator is compared with the thresholds
(:mod:`mlforce.selection`):

* below ``lower``: trusted; the state goes into a small ring buffer of snapshots;
* between: **label** (``on_the_fly``: the reference is called through the ledger and the next
  step continues with the reference forces) or keep as a **candidate** (``collect``);
* at/above ``upper``, or a guard trips: **roll back** to the last trusted snapshot, label the
  crossing frame if configured, then end the walker or continue with new velocities. The
  guards (every step): non-finite numbers, atoms too close, forces too large, too hot, and
  covalent bonds that differ from the walker's start (``md.guards.keep_bonds``: a poor early
  model's hole, e.g. an H torn off at 700 K, is left rather than explored and labelled).

Forces that move the atoms are the deterministic model's (dropout off) unless the calculator
was built with ``prediction="mc_mean"``. Everything random comes from the walker's seed.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.io.extxyz import write_extxyz
from ase.md.langevin import Langevin
from ase.md.md import MolecularDynamics
from ase.md.nvtberendsen import NVTBerendsen
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
from ase.md.verlet import VelocityVerlet

from mlforce import keys
from mlforce.calculators.ml import MLForceCalculator
from mlforce.config import MDConfig, ReferenceConfig
from mlforce.errors import ConfigError, StructureError
from mlforce.graph import check_atoms
from mlforce.selection import Decision, bond_pairs, decide, guard_violation, thresholds
from mlforce.store import LabelStore

Logger = Callable[[str], None]


@dataclass
class WalkerSummary:
    """What one walker did. Times in s, simulated time in fs, σ in eV/Å (calibrated)."""

    walker: int
    temperature_K: float
    steps: int = 0
    simulated_fs: float = 0.0
    checks: int = 0
    labels: dict[str, int] = field(default_factory=dict)  # ok labels by trigger
    failed_labels: int = 0
    candidates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # "budget"/"gap"
    rollbacks: int = 0
    restarts: int = 0
    restarts_after_candidate: int = 0  # collect mode with after_candidate: restart
    guards: dict[str, int] = field(default_factory=dict)
    stop_reason: str = "completed"
    triggers_per_ps: float = 0.0  # uncertainty triggers (labels or candidates) per ps
    sigma_mean: float = 0.0
    sigma_max: float = 0.0
    model_seconds: float = 0.0
    reference_seconds: float = 0.0
    label_ids: list[int] = field(default_factory=list)
    trajectory: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_labels(self) -> int:
        return sum(self.labels.values())


def check_md_inputs(atoms: Atoms, calc: MLForceCalculator, temperature: float) -> None:
    """Clear errors before any step runs: unknown elements, NaN, temperature <= 0."""
    if not 0 < temperature < float("inf"):
        raise ConfigError(f"temperature must be finite and > 0 K, got {temperature}")
    check_atoms(atoms, calc.checkpoint.species, where=atoms.get_chemical_formula())


def make_dynamics(
    atoms: Atoms, md: MDConfig, temperature: float, rng: np.random.Generator
) -> MolecularDynamics:
    """The configured ASE integrator (Langevin NVT, VelocityVerlet NVE or Berendsen NVT)."""
    dt = md.timestep_fs * units.fs
    if md.thermostat == "langevin":
        return Langevin(
            atoms, dt, temperature_K=temperature, friction=md.friction / units.fs,
            fixcm=False, rng=rng,
        )  # fmt: skip
    if md.thermostat == "berendsen":
        return NVTBerendsen(atoms, dt, temperature_K=temperature, taut=md.taut_fs * units.fs)
    return VelocityVerlet(atoms, dt)


def _thermalize(atoms: Atoms, temperature: float, rng: np.random.Generator) -> None:
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    if not atoms.pbc.any() and len(atoms) > 2:
        ZeroRotation(atoms)


def run_walker(
    calc: MLForceCalculator,
    atoms: Atoms,
    temperature: float,
    md: MDConfig,
    *,
    seed: int = 0,
    walker: int = 0,
    iteration: int = 0,
    steps: int | None = None,
    store: LabelStore | None = None,
    reference: ReferenceConfig | None = None,
    model_hash: str = "",
    trajectory: str | Path | None = None,
    candidates: list[Atoms] | None = None,
    progress: bool = False,
    log: Logger | None = None,
) -> WalkerSummary:
    """Run one walker; labels go to ``store`` (needs ``reference``); returns its summary.

    ``atoms`` is advanced in place (its final state is the walker's). In ``collect`` mode the
    candidate frames (σ in ``info``, model forces in ``arrays["model_forces"]``) are appended
    to ``candidates``.
    """
    from mlforce.labeling import label

    cfg, guards = md.triggers, md.guards
    steps = md.steps if steps is None else steps
    check_md_inputs(atoms, calc, temperature)
    if store is not None and reference is None:
        raise ConfigError("labelling during MD needs a reference config")
    if calc.prediction == "mc_mean" and cfg.check_every != 1:
        raise ConfigError("prediction 'mc_mean' needs md.triggers.check_every = 1")
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    audit_rng = np.random.default_rng([seed, 1])
    _thermalize(atoms, temperature, rng)
    dyn = make_dynamics(atoms, md, temperature, rng)
    summary = WalkerSummary(walker=walker, temperature_K=temperature)
    labels: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    triggers: Counter[str] = Counter()  # labels asked for (label or candidate), by trigger
    guard_counts: Counter[str] = Counter()
    ring: deque[tuple[int, np.ndarray, np.ndarray]] = deque(maxlen=cfg.rollback_buffer)
    ring.append((0, atoms.get_positions(), atoms.get_momenta()))
    start_bonds = bond_pairs(atoms, guards.bond_factor) if guards.keep_bonds else None
    recent: list[float] = []
    sigmas: list[float] = []
    last_label_step: int | None = None
    budget_used = 0
    traj_fh = None
    if trajectory is not None:
        Path(trajectory).parent.mkdir(parents=True, exist_ok=True)
        traj_fh = open(trajectory, "w")  # closed in the finally below
        summary.trajectory = str(trajectory)
    dt_fs = md.timestep_fs
    calc.uncertainty = True
    bar = _ProgressBar(steps, walker, progress, log)

    def do_label(frame: Atoms, forces: np.ndarray, trigger: str, d: Decision, sigma: float,
                 raw: float | None = None):  # fmt: skip
        """Label now (on_the_fly) or keep as a candidate (collect); the reference forces or None."""
        nonlocal budget_used, last_label_step
        step = dyn.nsteps
        prov = {
            "iteration": iteration, "walker": walker, "md_step": step,
            "time_fs": step * dt_fs, "trigger": trigger, "max_force_std": float(sigma),
            "max_force_std_raw": raw, "threshold": float(d.lower), "model_hash": model_hash,
        }  # fmt: skip
        if raw is None or not np.isfinite(raw):
            del prov["max_force_std_raw"]
        budget_used += 1
        last_label_step = step
        triggers[trigger] += 1
        if cfg.mode == "collect":
            summary.candidates += 1
            if candidates is not None:
                frame.info.update(prov)
                frame.arrays["model_forces"] = forces
                candidates.append(frame)
            return None
        if store is None or reference is None:
            return None
        result = label([frame], reference, store, prov, [forces], progress=False)
        summary.reference_seconds += result.reference_seconds
        row_id = result.ids[0]
        summary.label_ids.append(row_id)
        if result.failed:
            summary.failed_labels += 1
            return None
        labels[trigger] += result.ok + result.skipped
        rows = store.atoms(f"id={row_id}")
        return rows[0].get_forces() if rows and rows[0].calc is not None else None

    def rollback(reason: str) -> bool:
        """Restore the last trusted snapshot; True if the walker goes on."""
        if dyn.nsteps == 0:  # the start itself is bad: nothing to roll back to
            summary.stop_reason = reason
            return False
        summary.rollbacks += 1
        _, pos, mom = ring[-1]
        atoms.set_positions(pos)
        atoms.set_momenta(mom)
        if cfg.on_upper == "stop" or summary.restarts >= cfg.max_restarts:
            summary.stop_reason = reason if cfg.on_upper == "stop" else f"max_restarts:{reason}"
            return False
        summary.restarts += 1
        _thermalize(atoms, temperature, rng)
        return True

    def back_to_trusted() -> None:
        """The last trusted snapshot with new thermal velocities (not counted as a rollback)."""
        _, pos, _ = ring[-1]
        atoms.set_positions(pos)
        _thermalize(atoms, temperature, rng)
        summary.restarts_after_candidate += 1

    start = time.perf_counter()
    try:
        for _ in dyn.irun(steps):
            step = dyn.nsteps
            results = calc.results
            model_forces = np.array(results["forces"])  # what drives the walker
            # the model's own prediction, recorded with labels (differs when a sample drives)
            point_forces = np.array(results.get(keys.POINT_FORCES, model_forces))
            frame = atoms.copy()
            frame.calc = None
            reason = guard_violation(atoms, model_forces, temperature, guards, start_bonds)
            decision_name, sigma = "trust", float("nan")
            if reason is not None:
                guard_counts[reason] += 1
                decision_name = reason
                if guards.label_guard_frames and budget_used < cfg.label_budget:
                    do_label(frame, point_forces, "guard", Decision("rollback", "guard", 0, 0), 0)
                if not rollback(reason):
                    _write(traj_fh, frame, step, dt_fs, results, decision_name)
                    break
            elif step > 0 and step % cfg.check_every == 0:  # step 0: the start, not MD's
                summary.checks += 1
                sigma = float(results["max_force_std"])
                raw = float(results["max_force_std_raw"])
                score = raw if cfg.threshold == "absolute" else sigma
                sigmas.append(sigma)
                lower, upper = thresholds(cfg, recent)
                recent.append(sigma)
                d = decide(score, cfg, lower, upper, step, last_label_step, budget_used,
                           float(audit_rng.random()))  # fmt: skip
                decision_name = d.action
                if d.action == "trust":
                    ring.append((step, atoms.get_positions(), atoms.get_momenta()))
                elif d.action == "label":
                    ref_forces = do_label(frame, point_forces, d.trigger, d, sigma, raw)
                    if ref_forces is not None and cfg.mode == "on_the_fly":
                        # the next step's first half-kick uses the reference forces
                        calc.results["forces"] = ref_forces
                        ring.append((step, atoms.get_positions(), atoms.get_momenta()))
                elif d.action == "candidate":
                    do_label(frame, point_forces, d.trigger, d, sigma, raw)
                    if cfg.after_candidate == "restart":
                        back_to_trusted()
                elif d.action == "skip":
                    skipped[d.trigger] += 1
                elif d.action == "rollback":
                    if cfg.label_on_upper and budget_used < cfg.label_budget:
                        do_label(frame, point_forces, "uncertainty", d, sigma, raw)
                    if not rollback("upper"):
                        _write(traj_fh, frame, step, dt_fs, results, decision_name, sigma)
                        break
            if step % md.trajectory_every == 0 or decision_name not in ("trust", "skip"):
                _write(traj_fh, frame, step, dt_fs, results, decision_name, sigma)
            calc.uncertainty = (step + 1) % cfg.check_every == 0
            bar.update(step, sigma, sum(labels.values()) + summary.candidates)
    finally:
        if traj_fh is not None:
            traj_fh.close()
        calc.uncertainty = True
        bar.close()
    elapsed = time.perf_counter() - start
    summary.steps = dyn.nsteps
    summary.simulated_fs = dyn.nsteps * dt_fs
    summary.labels = dict(labels)
    summary.skipped = dict(skipped)
    summary.guards = dict(guard_counts)
    summary.model_seconds = max(0.0, elapsed - summary.reference_seconds)
    summary.triggers_per_ps = triggers["uncertainty"] / max(summary.simulated_fs / 1000.0, 1e-9)
    if sigmas:
        summary.sigma_mean = float(np.mean(sigmas))
        summary.sigma_max = float(np.max(sigmas))
    return summary


def _write(fh, frame: Atoms, step: int, dt_fs: float, results: dict, decision: str,
           sigma: float = float("nan")) -> None:  # fmt: skip
    if fh is None:
        return
    out = frame.copy()
    out.info = {
        "md_step": step, "time_fs": step * dt_fs, "model_energy": float(results["energy"]),
        "max_force_std": sigma, "decision": decision,
    }  # fmt: skip
    if "bias_energy" in results:  # a biased walker (mlforce.bias): model_energy includes it
        out.info["bias_energy"] = float(results["bias_energy"])
    write_extxyz(fh, [out])
    fh.flush()


class _ProgressBar:
    """A rich progress bar on a terminal; a log line every 10% otherwise."""

    def __init__(self, steps: int, walker: int, enabled: bool, log: Logger | None) -> None:
        self.steps, self.walker, self.log = steps, walker, log
        self.progress = None
        self.next_log = 0
        if enabled:
            from rich.progress import Progress

            self.progress = Progress(transient=False)
            self.task = self.progress.add_task(f"walker {walker}", total=steps)
            self.progress.start()

    def update(self, step: int, sigma: float, labels: int) -> None:
        text = f"walker {self.walker} step {step}/{self.steps} σ {sigma:.3f} labels {labels}"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, description=text)
        elif self.log is not None and step >= self.next_log:
            self.log(text)
            self.next_log = step + max(1, self.steps // 10)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def load_start_structure(path: str | Path) -> Atoms:
    """First frame of a structure file, with a clear error if it is unusable."""
    from mlforce.data import read_structures

    frames = read_structures(path)
    if not frames:
        raise StructureError(f"{path}: no structure")
    return frames[0]
