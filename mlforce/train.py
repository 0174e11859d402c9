"""Training: energy + force loss, AdamW, warm-up + cosine schedule, EMA, early stopping.

Loss per batch: ``energy_weight * mean((ΔE / n_atoms)^2) + force_weight * mean(ΔF^2)`` with
energies in eV and forces in eV/Å. Dropout masks come from a ``torch.Generator`` seeded with
``training.seed`` (member k of a committee uses ``seed + k``), so a run without a wall-time cap
is reproducible. With ``max_minutes`` set the schedule follows whichever budget (epochs or
time) runs out first, so the result then depends on machine speed.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ase import Atoms
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch_geometric.data import Data

from mlforce import keys
from mlforce.config import Config
from mlforce.data import graphs_from_frames, species_of
from mlforce.device import resolve_device, set_threads
from mlforce.errors import ConfigError, StructureError
from mlforce.evaluate import evaluate_graphs, predict_graphs
from mlforce.forces import compute_forces
from mlforce.graph import batch_graphs, reference_labels
from mlforce.latent import LatentReference, atom_features
from mlforce.model import ForceField
from mlforce.nn.dropout import DropoutKeys
from mlforce.uncertainty import calibrate

Logger = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    """Trained member models (EMA weights at the best validation force MAE) and metrics."""

    models: list[ForceField]
    metrics: dict[str, Any]
    history: list[list[dict[str, float]]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    latent: LatentReference | None = None  # training atoms' features (uncertainty.latent_atoms)


def _dtype(config: Config) -> torch.dtype:
    return torch.float64 if config.model.dtype == "float64" else torch.float32


def build_model(
    species: Sequence[int], config: Config, train_frames: Sequence[Atoms]
) -> ForceField:
    """A fresh model with per-species shift/scale fitted on ``train_frames``."""
    model = ForceField(species, config.model)
    energies, forces = [], []
    for k, atoms in enumerate(train_frames):
        e, f = reference_labels(atoms, where=f"training frame {k}")
        energies.append(e)
        forces.append(f)
    model.fit_shift_scale([a.numbers for a in train_frames], energies, np.concatenate(forces))
    return model


def _lr_factor(progress: float, warmup_fraction: float, final_ratio: float) -> float:
    """Linear warm-up then cosine decay from 1 to ``final_ratio``; ``progress`` in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / warmup_fraction, 1e-3)
    p = min(1.0, (progress - warmup_fraction) / max(1e-9, 1.0 - warmup_fraction))
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def _loss(model: ForceField, batch: Any, config: Config, dropout: DropoutKeys | None):
    out = compute_forces(model, batch, create_graph=True, dropout=dropout)
    n_atoms = torch.bincount(batch.batch, minlength=batch.num_graphs).to(torch.float64)
    de = (out[keys.ENERGY] - batch.energy_ref.to(torch.float64)) / n_atoms
    df = out[keys.FORCES] - batch.forces_ref
    t = config.training
    return t.energy_weight * (de**2).mean() + t.force_weight * (df**2).mean()


def train_member(
    model: ForceField,
    train_graphs: Sequence[Data],
    val_graphs: Sequence[Data],
    config: Config,
    seed: int,
    log: Logger = _stderr,
    label: str = "",
) -> tuple[ForceField, dict[str, Any], list[dict[str, float]]]:
    """Train one model in place; returns the EMA model at the best validation force MAE."""
    t = config.training
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
        if t.ema_decay
        else None
    )
    val_device = [g.to(device) for g in val_graphs]
    n_batches = math.ceil(len(train_graphs) / t.batch_size)
    warmup = t.warmup_epochs / max(t.max_epochs, 1)
    final_ratio = t.lr_min / t.lr
    budget_s = t.max_minutes * 60.0 if t.max_minutes else math.inf
    # SWA: the cosine runs over the first (1 - f) of the schedule down to swa_lr, which then
    # holds while every step's weights enter a uniform average (Izmailov et al. 2018)
    swa_start = 1.0 - t.swa_fraction
    swa_lr = t.swa_lr if t.swa_lr is not None else t.lr / 5.0
    swa = AveragedModel(model, use_buffers=True) if t.swa_fraction > 0 else None
    swa_steps = 0
    start = time.perf_counter()
    best: dict[str, Any] = {"force_mae": math.inf}
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = []
    stale = 0
    last_log = 0.0
    stop_reason = "max_epochs"
    for epoch in range(1, t.max_epochs + 1):
        model.train()
        order = torch.randperm(len(train_graphs), generator=gen).tolist()
        running = 0.0
        for b in range(n_batches):
            # The schedule follows the clock only where the time budget binds: from epoch 2 on,
            # time runs ahead of epochs only if the pace projects past the budget. In epoch 1
            # it would win at once (epochs 0, time > 0) and make the result depend on the
            # machine's load whenever the budget does not bind.
            elapsed = time.perf_counter() - start if epoch > 1 else 0.0
            progress = max((epoch - 1 + b / n_batches) / t.max_epochs, elapsed / budget_s)
            in_swa = swa is not None and progress >= swa_start
            if swa is None:
                lr = t.lr * _lr_factor(progress, warmup, final_ratio)
            elif in_swa:
                lr = swa_lr
            else:  # the warm-up + cosine squeezed into the phase before averaging
                lr = t.lr * _lr_factor(progress / swa_start, warmup / swa_start, swa_lr / t.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            idx = order[b * t.batch_size : (b + 1) * t.batch_size]
            batch = batch_graphs([train_graphs[i] for i in idx]).to(device)
            dropout = (
                DropoutKeys.from_generator(batch.num_graphs, gen, device, t.deterministic_fraction)
                if model.has_dropout
                else None
            )
            loss = _loss(model, batch, config, dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            if ema is not None:
                ema.update_parameters(model)
            if in_swa:
                swa.update_parameters(model)
                swa_steps += 1
            running += float(loss.detach())
        current = ema.module if ema is not None else model
        current.eval()
        metrics = evaluate_graphs(current, val_device)
        elapsed = time.perf_counter() - start
        record = {
            "epoch": epoch,
            "seconds": elapsed,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": running / n_batches,
            "val_force_mae": metrics["force_mae"],
            "val_energy_mae_per_atom": metrics["energy_mae_per_atom"],
        }
        history.append(record)
        if metrics["force_mae"] < best["force_mae"]:
            best = {**metrics, "epoch": epoch}
            best_state = copy.deepcopy(current.state_dict())
            stale = 0
        else:
            stale += 1
        if epoch == 1 or elapsed - last_log >= 15.0 or epoch == t.max_epochs:
            last_log = elapsed
            log(
                f"{label}epoch {epoch:4d}  lr {record['lr']:.2e}  loss {record['train_loss']:.4g}"
                f"  val F MAE {metrics['force_mae']:.4f} eV/Å  E MAE "
                f"{1000 * metrics['energy_mae_per_atom']:.2f} meV/atom  best "
                f"{best['force_mae']:.4f} (epoch {best['epoch']})  {elapsed:.0f} s"
            )
        if stale >= t.patience and swa is None:  # SWA runs its whole schedule
            stop_reason = "early_stopping"
            break
        if elapsed >= budget_s:
            stop_reason = "time_limit"
            break
    if swa_steps:  # the average of the last phase, whatever the best epoch was before it
        best_state = copy.deepcopy(swa.module.state_dict())
        best["epoch"] = len(history)
        stop_reason += f", SWA over {swa_steps} steps"
    model.load_state_dict(best_state)
    model.eval()
    refit_energy_shift(model, train_graphs)
    best = {**evaluate_graphs(model, val_device), "epoch": best["epoch"]}
    seconds = time.perf_counter() - start
    log(
        f"{label}done: {stop_reason} after {len(history)} epochs, {seconds:.0f} s; best val "
        f"force MAE {best['force_mae']:.4f} eV/Å at epoch {best['epoch']}"
    )
    summary = {
        "val_force_mae": best["force_mae"],
        "val_force_rmse": best["force_rmse"],
        "val_energy_mae_per_atom": best["energy_mae_per_atom"],
        "best_epoch": best["epoch"],
        "epochs": len(history),
        "seconds": seconds,
        "stop_reason": stop_reason,
    }
    return model, summary, history


def refit_energy_shift(model: ForceField, graphs: Sequence[Data], batch_size: int = 32) -> None:
    """Correct the per-species energy shifts so the dropout-free model has no energy offset.

    Trained under dropout, the deterministic model's energies carry a small bias (dropout
    changes the mean through the nonlinearities): a least-squares shift per species on the
    training residuals removes it. Forces are unaffected.
    """
    energy, _ = predict_graphs(model, graphs, batch_size)
    residual = np.array([float(g.energy_ref[0]) for g in graphs]) - energy
    counts = np.zeros((len(graphs), len(model.species)))
    for row, g in enumerate(graphs):
        counts[row] = np.bincount(g.species.cpu().numpy(), minlength=len(model.species))
    delta, *_ = np.linalg.lstsq(counts, residual, rcond=None)
    with torch.no_grad():
        model.atomic_shift += torch.as_tensor(
            delta, dtype=torch.float64, device=model.atomic_shift.device
        )


def train_models(
    train_frames: Sequence[Atoms],
    val_frames: Sequence[Atoms],
    config: Config,
    warm_start: Sequence[ForceField] | None = None,
    log: Logger = _stderr,
) -> TrainResult:
    """Train ``config.training.ensemble`` models (one unless a committee is asked for).

    ``warm_start``: models to continue from (the active-learning loop retrains the last
    round's model); used when their species cover the data, else training starts afresh.
    """
    if len(train_frames) == 0 or len(val_frames) == 0:
        raise StructureError("training needs at least one training and one validation frame")
    t = config.training
    if t.threads:
        set_threads(t.threads)
    device = resolve_device(config.device)
    dtype = _dtype(config)
    species = species_of([*train_frames, *val_frames])
    if warm_start:
        known = set(warm_start[0].species)
        if set(species) <= known:
            species = list(warm_start[0].species)
        else:
            log("warm start skipped: the data has elements the previous model lacks")
            warm_start = None
    if not warm_start:  # a warm start keeps its model's dropout placement
        resolved = config.for_training_frames(len(train_frames) + len(val_frames))
        if resolved is not config:
            m = resolved.model
            log(
                f"{len(train_frames) + len(val_frames)} frames >= model.large_data.frames: "
                f"dropout in the last {m.dropout_blocks or 'every'} block(s), node "
                f"{m.node_dropout}, edge {m.edge_dropout}; σ local_radius "
                f"{resolved.uncertainty.local_radius} Å; {resolved.training.max_epochs} epochs "
                f"at most, {resolved.training.max_minutes} min"
            )
            config = resolved
    cutoff = config.model.cutoff
    train_graphs = graphs_from_frames(train_frames, species, cutoff, dtype, with_labels=True)
    val_graphs = graphs_from_frames(val_frames, species, cutoff, dtype, with_labels=True)
    members, summaries, histories = [], [], []
    for k in range(t.ensemble):
        seed = t.seed + k
        torch.manual_seed(seed)
        if warm_start:
            model = copy.deepcopy(warm_start[k % len(warm_start)])
        else:
            model = build_model(species, config, train_frames)
        model.to(device)
        label = f"[member {k + 1}/{t.ensemble}] " if t.ensemble > 1 else ""
        log(
            f"{label}training on {len(train_graphs)} frames (validation {len(val_graphs)}), "
            f"{model.num_parameters()} parameters, device {device}, seed {seed}"
            + (", warm start" if warm_start else "")
        )
        model, summary, history = train_member(
            model, train_graphs, val_graphs, config, seed, log, label
        )
        members.append(model)
        summaries.append(summary)
        histories.append(history)
    metrics = dict(summaries[0]) if len(summaries) == 1 else _merge(summaries)
    metrics.update(
        n_train=len(train_graphs), n_val=len(val_graphs), ensemble=t.ensemble, device=str(device)
    )
    calibration: dict[str, Any] = {"method": "none"}
    u = config.uncertainty
    latent = None
    if u.latent_atoms and len(members) == 1 and members[0].has_dropout:
        latent = LatentReference.build(
            atom_features(members[0], [g.to(device) for g in train_graphs]),
            [g.numbers.cpu().numpy() for g in train_graphs],
            max_per_element=u.latent_atoms,
            seed=t.seed,
        )
        log(
            f"latent reference: {latent.n_points} training atoms' features "
            f"(at most {u.latent_atoms} per element); σ = sqrt(σ_MC · latent distance)"
        )
    if len(members) > 1 or members[0].has_dropout:
        val_device = [g.to(device) for g in val_graphs]
        calibration = calibrate(
            members, val_device, u.mc_samples, u.seed, u.calibration, latent=latent
        )
        if len(members) == 1:
            calibration["mc_samples"] = u.mc_samples  # the T the scale was fitted with
        if latent is not None:
            calibration["latent_atoms"] = latent.n_points
        if u.local_radius:
            if u.local_radius > members[0].cutoff:
                raise ConfigError(
                    f"uncertainty.local_radius {u.local_radius} Å exceeds the model cutoff "
                    f"{members[0].cutoff} Å"
                )
            calibration["local_radius"] = u.local_radius  # σ of the worst neighbourhood
        log(f"uncertainty calibration on {len(val_graphs)} validation frames: {calibration}")
    return TrainResult(members, metrics, histories, calibration, latent)


def _merge(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"members": summaries}
    for key in ("val_force_mae", "val_force_rmse", "val_energy_mae_per_atom"):
        out[key] = float(np.mean([s[key] for s in summaries]))
    out["seconds"] = float(sum(s["seconds"] for s in summaries))
    return out
