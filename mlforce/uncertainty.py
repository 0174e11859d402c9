"""Monte Carlo dropout force uncertainty in one batched pass, committees, and calibration.

T stochastic samples are T copies of the (batched) graph, evaluated as one disjoint graph in a
single forward + backward pass, each copy with its own dropout key (``hash(seed, t)``). The
deterministic (dropout-off) prediction rides along as one more copy with dropout switched off.

Definitions (std over samples, ``ddof = 0`` as ``numpy.std``):

* ``forces_std_xyz`` (n, 3): std of each force component, eV/Å;
* ``forces_std`` (n,): per-atom std, the norm of the 3-component std,
  ``sqrt(std_x^2 + std_y^2 + std_z^2)``, eV/Å;
* ``max_force_std`` (B,): the largest ``forces_std`` in each structure, eV/Å; with a
  ``local_radius`` (Å) each atom's σ is first averaged over the atoms within that distance
  (:func:`local_mean`), so it is the σ of the worst neighbourhood;
* ``energy_std`` (B,): std of the total energy, eV.

Raw values come from the samples; :func:`apply_calibration` multiplies stds by the scale fitted
on validation data (:func:`fit_calibration`), which turns them into expected errors. With a
``latent`` reference (:class:`mlforce.latent.LatentReference`, stored in checkpoints trained
with ``uncertainty.latent_atoms``) each atom's stds are first multiplied by ``sqrt(d / σ)``,
so that its σ is the geometric mean ``sqrt(σ · d)`` of the MC spread and its latent distance
d to the training atoms (docs/benchmarks.md 27); everything downstream (calibration,
neighbourhoods, maxima) is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mlforce import keys
from mlforce.forces import compute_forces
from mlforce.graph import replicate
from mlforce.latent import LatentReference
from mlforce.model import ForceField, _batch_vector, _num_graphs
from mlforce.nn.dropout import DropoutKeys, MaskCache

MASK_CACHE = MaskCache()  # MC masks of walkers evaluated again with the same seed (mc_predict)


@dataclass
class Prediction:
    """Deterministic prediction plus sample statistics for a batch of B graphs, n atoms."""

    energy: Tensor  # (B,) eV
    forces: Tensor  # (n, 3) eV/Å
    energy_samples: Tensor  # (T, B) eV
    forces_samples: Tensor  # (T, n, 3) eV/Å
    batch: Tensor  # (n,) graph of each atom
    stress: Tensor | None = None  # (B, 3, 3) eV/Å^3
    pairs: Tensor | None = None  # (2, P) atom pairs within local_radius (None: no averaging)
    # (n,) multiplies each atom's sample stds: sqrt(d / σ) makes them sqrt(σ · d), σ combined
    # with the latent distance d (mlforce.latent); None: the MC spread alone
    atom_factor: Tensor | None = None

    @property
    def n_samples(self) -> int:
        return int(self.energy_samples.shape[0])

    @property
    def energy_mean(self) -> Tensor:
        return self.energy_samples.mean(0)

    @property
    def forces_mean(self) -> Tensor:
        return self.forces_samples.mean(0)

    @property
    def energy_std(self) -> Tensor:
        return self.energy_samples.std(0, unbiased=False)

    @property
    def forces_std_xyz(self) -> Tensor:
        std = self.forces_samples.std(0, unbiased=False)
        return std if self.atom_factor is None else std * self.atom_factor.unsqueeze(1)

    @property
    def forces_std(self) -> Tensor:
        return torch.linalg.norm(self.forces_std_xyz, dim=1)

    @property
    def max_force_std(self) -> Tensor:
        return structure_max(local_mean(self.forces_std, self.pairs), self.batch, len(self.energy))


def local_pairs(graph: Any, radius: float | None) -> Tensor | None:
    """(2, P) the graph's directed edges (source, target) shorter than ``radius`` Å; None if no
    radius. Every pair within the model's cutoff is an edge, so ``radius`` must not exceed it."""
    if not radius:
        return None
    from mlforce.model import edge_vectors

    length = torch.linalg.norm(edge_vectors(graph), dim=1)
    return graph.edge_index[:, length < radius]


def local_mean(per_atom: Tensor, pairs: Tensor | None) -> Tensor:
    """Per-atom values (n,) averaged over each atom and its ``pairs`` neighbours (n,)."""
    if pairs is None:
        return per_atom
    source, target = pairs[0], pairs[1]
    total = per_atom.clone().index_add_(0, target, per_atom[source])
    count = torch.ones_like(per_atom).index_add_(0, target, torch.ones_like(per_atom[source]))
    return total / count


def structure_max(per_atom: Tensor, batch: Tensor, n_graphs: int) -> Tensor:
    """Largest per-atom value of each graph (B,)."""
    out = torch.zeros(n_graphs, dtype=per_atom.dtype, device=per_atom.device)
    return out.scatter_reduce(0, batch, per_atom, reduce="amax", include_self=True)


def default_max_edges(device: torch.device) -> int:
    """Edges per pass above which MC copies are split into several passes.

    On the CPU, throughput saturates near 13 µs per edge once a pass holds a few thousand
    edges, and passes beyond about 10k edges get slower as (E, 3F) tensors leave the cache
    (measured with 1, 8 and 64 ethanol walkers, T = 16); a GPU wants the largest pass.
    """
    return 2_000_000 if device.type == "cuda" else 8_000


def mc_predict(
    model: ForceField,
    graph: Any,
    n_samples: int,
    seed: int = 0,
    compute_stress: bool = False,
    max_edges: int | None = None,
    local_radius: float | None = None,
    latent: LatentReference | None = None,
) -> Prediction:
    """Deterministic prediction and ``n_samples`` MC-dropout samples, batched.

    The T + 1 copies (copy 0 with dropout off) are evaluated as disjoint graphs, as many per
    forward + backward pass as fit in ``max_edges`` (default :func:`default_max_edges`).
    ``local_radius`` (Å): ``max_force_std`` of the worst neighbourhood (:func:`local_mean`).
    ``latent``: the training atoms' features; σ becomes per atom the geometric mean of the MC
    spread and the latent distance (from copy 0's features in the same pass: no extra forward).
    """
    if n_samples < 2:
        raise ValueError(f"MC uncertainty needs at least 2 samples, got {n_samples}")
    n_graphs = _num_graphs(graph)
    n = graph.pos.shape[0]
    device = graph.pos.device
    copies = n_samples + 1
    sample_keys = DropoutKeys.for_samples(seed, n_samples, n_graphs, device).graph_keys
    graph_keys = torch.cat([torch.zeros(n_graphs, dtype=torch.long, device=device), sample_keys])
    active = torch.ones(copies * n_graphs, dtype=torch.bool, device=device)
    active[:n_graphs] = False
    limit = max_edges or default_max_edges(device)
    per_pass = max(1, min(copies, limit // max(1, graph.edge_index.shape[1])))
    energies, forces, stresses = [], [], []
    features: list[Tensor] = []  # copy 0's features (dropout off) for the latent distance
    batch = _batch_vector(graph)
    for first in range(0, copies, per_pass):
        count = min(per_pass, copies - first)
        sl = slice(first * n_graphs, (first + count) * n_graphs)
        masks = MASK_CACHE.masks_for(
            (seed, n_samples, first, count, n_graphs, str(device)),
            atoms=(batch, graph.local_atom),
            pairs=(graph.edge_index, graph.cell_shift),
            elements=count * max(n * model.config.features, graph.edge_index.shape[1]),
        )
        out = compute_forces(
            model,
            replicate(graph, count),
            create_graph=False,
            compute_stress=compute_stress,
            dropout=DropoutKeys(graph_keys[sl], active[sl], masks),
            features=features if latent is not None and first == 0 else None,
        )
        energies.append(out[keys.ENERGY].reshape(count, n_graphs))
        forces.append(out[keys.FORCES].reshape(count, n, 3))
        if compute_stress:
            stresses.append(out[keys.STRESS].reshape(count, n_graphs, 3, 3))
    energy = torch.cat(energies)
    force = torch.cat(forces)
    stress = torch.cat(stresses)[0] if compute_stress else None
    factor = None
    if latent is not None:
        spread = torch.linalg.norm(force[1:].std(0, unbiased=False), dim=1)
        factor = latent.sigma_factor(features[0][:n], graph.numbers, spread)
    return Prediction(
        energy[0], force[0], energy[1:], force[1:], batch, stress,
        local_pairs(graph, local_radius), factor,
    )  # fmt: skip


def committee_predict(
    models: Sequence[ForceField],
    graph: Any,
    compute_stress: bool = False,
    local_radius: float | None = None,
) -> Prediction:
    """A deep ensemble: member predictions as samples, their mean as the prediction."""
    outs = [
        compute_forces(m, graph, create_graph=False, compute_stress=compute_stress) for m in models
    ]
    energy = torch.stack([o[keys.ENERGY] for o in outs])
    forces = torch.stack([o[keys.FORCES] for o in outs])
    stress = torch.stack([o[keys.STRESS] for o in outs]).mean(0) if compute_stress else None
    return Prediction(
        energy.mean(0), forces.mean(0), energy, forces, _batch_vector(graph), stress,
        local_pairs(graph, local_radius),
    )  # fmt: skip


# --- calibration -----------------------------------------------------------------------------


def fit_calibration(
    errors_xyz: np.ndarray,
    std_xyz: np.ndarray,
    numbers: np.ndarray | None = None,
    method: str = "scale",
) -> dict[str, Any]:
    """Fit one scale s so that s·σ matches the errors on validation data.

    ``errors_xyz`` and ``std_xyz`` (N, 3): force-component errors and raw MC stds (eV/Å).
    ``method``:

    * ``scale``: Gaussian maximum likelihood, ``s^2 = mean(e^2 / σ^2)`` (as apax);
    * ``robust``: the same model fitted by the median, ``s = median(|e| / σ) / 0.6745``: a few
      atoms with tiny σ and a real error cannot inflate it (measured on active-learning
      validation sets, where the likelihood fit came out 3x too large: miscalibration area
      0.26 against 0.02, see docs/benchmarks.md);
    * ``per_element``: a likelihood scale per atomic number (``numbers`` (N,));
    * ``none``.

    Returns a JSON-able dict stored in the checkpoint.
    """
    if method == "none":
        return {"method": "none"}
    e2 = np.asarray(errors_xyz, dtype=np.float64) ** 2
    var = np.maximum(np.asarray(std_xyz, dtype=np.float64) ** 2, 1e-12)

    def scale(mask: np.ndarray) -> float:
        if method == "robust":
            return float(np.median(np.sqrt(e2[mask] / var[mask])) / 0.6744897501960817)
        return float(np.sqrt(np.mean(e2[mask] / var[mask])))

    everyone = np.ones(len(e2), dtype=bool)
    result: dict[str, Any] = {"method": method, "scale": scale(everyone), "n_atoms": len(e2)}
    if method == "per_element":
        if numbers is None:
            raise ValueError("per_element calibration needs the atomic numbers")
        numbers = np.asarray(numbers)
        result["per_element"] = {str(int(z)): scale(numbers == z) for z in np.unique(numbers)}
    elif method not in ("scale", "robust"):
        raise ValueError(
            f"unknown calibration method {method!r} (none, scale, robust, per_element)"
        )
    return result


def calibration_factors(calibration: dict[str, Any], numbers: Tensor) -> Tensor:
    """Per-atom scale factors (n,) for ``numbers`` (n,); ones when uncalibrated."""
    method = calibration.get("method", "none")
    ones = torch.ones(numbers.shape[0], dtype=torch.float64, device=numbers.device)
    if method == "none" or "scale" not in calibration:
        return ones
    factors = ones * float(calibration["scale"])
    for z, s in calibration.get("per_element", {}).items():
        factors = torch.where(numbers == int(z), torch.full_like(factors, float(s)), factors)
    return factors


def apply_calibration(
    prediction: Prediction, calibration: dict[str, Any], numbers: Tensor
) -> dict[str, Tensor]:
    """Calibrated ``forces_std`` (n,), ``max_force_std`` (B,) and ``energy_std`` (B,) in eV (/Å)."""
    factors = calibration_factors(calibration, numbers).to(prediction.forces.dtype)
    forces_std = prediction.forces_std * factors
    n_graphs = int(prediction.energy.shape[0])
    max_std = structure_max(local_mean(forces_std, prediction.pairs), prediction.batch, n_graphs)
    global_scale = float(calibration.get("scale", 1.0)) if calibration.get("method") else 1.0
    return {
        keys.FORCES_STD: forces_std,
        keys.MAX_FORCE_STD: max_std,
        keys.ENERGY_STD: prediction.energy_std * global_scale,
    }


# --- whole data sets ---------------------------------------------------------------------------


@dataclass
class DatasetPrediction:
    """Predictions for N structures (numpy, float64): per-structure lists for per-atom arrays."""

    energy: np.ndarray  # (N,) eV, deterministic model (committee: mean)
    forces: list[np.ndarray]  # [(n_b, 3)] eV/Å, deterministic model (committee: mean)
    forces_mean: list[np.ndarray]  # [(n_b, 3)] eV/Å, mean over samples
    forces_std_xyz: list[np.ndarray]  # [(n_b, 3)] eV/Å, raw component std over samples
    energy_std: np.ndarray  # (N,) eV, raw
    numbers: list[np.ndarray]  # [(n_b,)] atomic numbers
    seconds: float = 0.0  # wall time of all predictions
    pairs: list[np.ndarray] | None = None  # [(2, P_b)] pairs within local_radius, per structure

    def forces_std(self, calibration: dict[str, Any] | None = None) -> list[np.ndarray]:
        """Per-atom std (n_b,) per structure, calibrated when ``calibration`` is given."""
        out = []
        for std, z in zip(self.forces_std_xyz, self.numbers):
            per_atom = np.linalg.norm(std, axis=1)
            if calibration:
                per_atom = per_atom * calibration_factors(calibration, torch.as_tensor(z)).numpy()
            out.append(per_atom)
        return out

    def max_force_std(self, calibration: dict[str, Any] | None = None) -> np.ndarray:
        """(N,) largest per-atom std of each structure (of the worst neighbourhood when
        predicted with a ``local_radius``), calibrated when asked."""
        per_atom = self.forces_std(calibration)
        if self.pairs is not None:
            per_atom = [
                local_mean(torch.as_tensor(s), torch.as_tensor(p)).numpy()
                for s, p in zip(per_atom, self.pairs)
            ]
        return np.array([s.max() for s in per_atom])


def predict_dataset(
    models: Sequence[ForceField],
    graphs: Sequence[Any],
    mc_samples: int = 16,
    seed: int = 0,
    batch_size: int = 8,
    local_radius: float | None = None,
    latent: LatentReference | None = None,
) -> DatasetPrediction:
    """MC-dropout (one model) or committee (several) predictions for many graphs.

    ``local_radius`` (Å): keep each structure's atom pairs within it, so that
    :meth:`DatasetPrediction.max_force_std` is that of the worst neighbourhood. ``latent``:
    σ combined with the latent distance (:func:`mc_predict`; one model only)."""
    import time

    from mlforce.graph import batch_graphs

    device = next(models[0].parameters()).device
    energy, energy_std = [], []
    forces, forces_mean, forces_std, numbers = [], [], [], []
    pairs: list[np.ndarray] = []
    start = time.perf_counter()
    for lo in range(0, len(graphs), batch_size):
        batch = batch_graphs(graphs[lo : lo + batch_size]).to(device)
        if len(models) > 1:
            pred = committee_predict(models, batch, local_radius=local_radius)
        else:
            pred = mc_predict(
                models[0], batch, mc_samples, seed, local_radius=local_radius, latent=latent
            )
        counts = torch.bincount(batch.batch, minlength=batch.num_graphs).tolist()
        cuts = np.cumsum(counts)[:-1]

        def split(t: Tensor, cuts: np.ndarray = cuts) -> list[np.ndarray]:
            return np.split(t.detach().cpu().double().numpy(), cuts)

        energy.append(pred.energy.detach().cpu().double().numpy())
        energy_std.append(pred.energy_std.detach().cpu().double().numpy())
        forces += split(pred.forces)
        forces_mean += split(pred.forces_mean)
        forces_std += split(pred.forces_std_xyz)
        numbers += np.split(batch.numbers.cpu().numpy(), cuts)
        if pred.pairs is not None:
            p = pred.pairs.cpu().numpy()
            starts = np.concatenate([[0], np.cumsum(counts)])
            owner = batch.batch.cpu().numpy()[p[1]]
            pairs += [p[:, owner == b] - starts[b] for b in range(len(counts))]
    return DatasetPrediction(
        np.concatenate(energy),
        forces,
        forces_mean,
        forces_std,
        np.concatenate(energy_std),
        numbers,
        time.perf_counter() - start,
        pairs if local_radius else None,
    )


def calibrate(
    models: Sequence[ForceField],
    graphs: Sequence[Any],
    mc_samples: int,
    seed: int,
    method: str = "scale",
    latent: LatentReference | None = None,
) -> dict[str, Any]:
    """Fit the calibration of the deterministic prediction's errors on labelled ``graphs``
    (of σ combined with the latent distance when ``latent`` is given)."""
    pred = predict_dataset(models, graphs, mc_samples, seed, latent=latent)
    errors = np.concatenate(
        [f - g.forces_ref.cpu().double().numpy() for f, g in zip(pred.forces, graphs)]
    )
    return fit_calibration(
        errors, np.concatenate(pred.forces_std_xyz), np.concatenate(pred.numbers), method
    )
