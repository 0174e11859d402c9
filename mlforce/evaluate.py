"""Deterministic predictions on many structures, and error metrics against reference labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from mlforce import keys
from mlforce.forces import compute_forces
from mlforce.graph import batch_graphs
from mlforce.model import ForceField


def predict_graphs(
    model: ForceField, graphs: Sequence[Data], batch_size: int = 32
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Dropout-free energies (B,) eV and per-structure forces [(n_b, 3)] eV/Å."""
    device = next(model.parameters()).device
    energies: list[np.ndarray] = []
    forces: list[np.ndarray] = []
    for start in range(0, len(graphs), batch_size):
        batch = batch_graphs(graphs[start : start + batch_size]).to(device)
        out = compute_forces(model, batch, create_graph=False)
        energies.append(out[keys.ENERGY].cpu().numpy())
        f = out[keys.FORCES].cpu().numpy().astype(np.float64)
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs).tolist()
        forces.extend(np.split(f, np.cumsum(counts)[:-1]))
    return np.concatenate(energies), forces


def force_metrics(
    energy_pred: np.ndarray,
    forces_pred: Sequence[np.ndarray],
    energy_ref: np.ndarray,
    forces_ref: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Errors of predictions against references.

    Keys: ``n_configs``; ``energy_mae_per_atom``, ``energy_rmse_per_atom`` (eV/atom);
    ``force_mae``, ``force_rmse`` (eV/Å, over Cartesian components); ``max_force_error``
    (eV/Å, largest per-atom error-vector norm).
    """
    n_atoms = np.array([len(f) for f in forces_ref], dtype=np.float64)
    de = (np.asarray(energy_pred) - np.asarray(energy_ref)) / n_atoms
    df = np.concatenate([np.asarray(p) - np.asarray(r) for p, r in zip(forces_pred, forces_ref)])
    return {
        "n_configs": len(forces_ref),
        "energy_mae_per_atom": float(np.mean(np.abs(de))),
        "energy_rmse_per_atom": float(np.sqrt(np.mean(de**2))),
        "force_mae": float(np.mean(np.abs(df))),
        "force_rmse": float(np.sqrt(np.mean(df**2))),
        "max_force_error": float(np.max(np.linalg.norm(df, axis=1))),
    }


def evaluate_graphs(
    model: ForceField | Sequence[ForceField], graphs: Sequence[Data], batch_size: int = 32
) -> dict:
    """Metrics of the deterministic model on labelled graphs (see :func:`force_metrics`).

    A sequence of models is a committee: its mean energy and forces are scored (what the
    calculator predicts with that checkpoint).
    """
    models = [model] if isinstance(model, ForceField) else list(model)
    predictions = [predict_graphs(m, graphs, batch_size) for m in models]
    energy = np.mean([p[0] for p in predictions], axis=0)
    forces = [np.mean(fs, axis=0) for fs in zip(*(p[1] for p in predictions))]
    e_ref = np.array([float(g.energy_ref[0]) for g in graphs])
    f_ref = [g.forces_ref.cpu().numpy().astype(np.float64) for g in graphs]
    return force_metrics(energy, forces, e_ref, f_ref)


def uncertainty_metrics(
    pred: Any, graphs: Sequence[Data], calibration: dict[str, Any] | None
) -> dict[str, Any]:
    """Errors of ``pred`` (a :class:`mlforce.uncertainty.DatasetPrediction`) and UQ quality.

    ``spearman_max_force``: rank correlation over structures of ``max_force_std`` with the true
    max per-atom force error (norm of the error vector); ``auroc_top10``: ROC-AUC of
    ``max_force_std`` for the 10% of structures with the largest true error;
    ``miscalibration_area``: per force component, with calibrated component stds.
    """
    from mlforce.metrics import auroc_top_fraction, miscalibration_area, spearman
    from mlforce.uncertainty import calibration_factors

    calibration = calibration or {"method": "none"}
    e_ref = np.array([float(g.energy_ref[0]) for g in graphs])
    f_ref = [g.forces_ref.cpu().numpy().astype(np.float64) for g in graphs]
    metrics = force_metrics(pred.energy, pred.forces, e_ref, f_ref)
    mean_metrics = force_metrics(pred.energy, pred.forces_mean, e_ref, f_ref)
    true_max = np.array([np.linalg.norm(f - r, axis=1).max() for f, r in zip(pred.forces, f_ref)])
    max_std = pred.max_force_std(calibration)
    errors = np.concatenate([f - r for f, r in zip(pred.forces, f_ref)])
    factors = np.concatenate(
        [calibration_factors(calibration, torch.as_tensor(z)).numpy() for z in pred.numbers]
    )
    std_cal = np.concatenate(pred.forces_std_xyz) * factors[:, None]
    metrics.update(
        force_mae_mc_mean=mean_metrics["force_mae"],
        spearman_max_force=spearman(max_std, true_max),
        auroc_top10=auroc_top_fraction(max_std, true_max, 0.1),
        miscalibration_area=miscalibration_area(errors, std_cal),
        miscalibration_area_raw=miscalibration_area(errors, np.concatenate(pred.forces_std_xyz)),
        mean_max_force_std=float(np.mean(max_std)),
        mean_true_max_force_error=float(np.mean(true_max)),
        calibration=calibration.get("method", "none"),
        inference_ms_per_structure=1000 * pred.seconds / max(len(graphs), 1),
    )
    return metrics
