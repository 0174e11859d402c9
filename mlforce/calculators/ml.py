"""ASE calculator for an mlforce checkpoint: forces plus MC-dropout force uncertainty.

One ``calculate()`` fills every property in ``implemented_properties``:

* ``energy``/``free_energy`` (eV), ``forces`` (n, 3) eV/Å, ``stress`` (Voigt 6, eV/Å^3,
  periodic cells only): the deterministic model (dropout off) by default, or the MC mean with
  ``prediction="mc_mean"``, or one posterior sample with ``prediction="sample"`` (the MC
  copy, or committee member, number ``sample_index`` of the T: a fixed mask, so a smooth
  potential); for a committee checkpoint, the committee mean unless ``"sample"``;
* ``energy_std`` (eV), ``forces_std`` (n,) eV/Å per atom (norm of the 3-component std over
  samples), ``max_force_std`` (eV/Å, max over atoms, or over neighbourhoods when the
  checkpoint has a ``local_radius``): **calibrated** with the checkpoint's
  calibration (an expected error) unless ``calibrated=False``; for a checkpoint that stores
  its training atoms' features (``uncertainty.latent_atoms``), per atom ``sqrt(σ_MC · d)`` with
  d the latent distance (:mod:`mlforce.latent`) before calibration;
* with ``bias_strength`` A > 0 (eV; checkpoints with a latent reference): energy and forces
  include the latent-space bias of :mod:`mlforce.bias` (width ``bias_width``), and
  ``bias_energy`` (eV) reports it; σ is that of the unbiased model;
* ``max_force_std_raw`` (eV/Å), ``energy_samples`` (T,) eV and ``forces_samples`` (T, n, 3)
  eV/Å: the raw MC (or committee) samples behind the statistics.

The MC samples use fixed dropout keys (``seed``), so the uncertainty is a smooth, reproducible
function of the geometry: the same structure always gets the same σ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mlforce import keys
from mlforce.bias import latent_bias
from mlforce.checkpoint import Checkpoint, load_checkpoint
from mlforce.device import resolve_device
from mlforce.errors import ConfigError
from mlforce.forces import compute_forces
from mlforce.graph import atoms_to_graph, batch_graphs
from mlforce.nn.dropout import DropoutKeys
from mlforce.uncertainty import Prediction, apply_calibration, committee_predict, mc_predict

_VOIGT = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


class MLForceCalculator(Calculator):
    """``MLForceCalculator(checkpoint, device="auto", mc_samples=None, ...)``.

    ``mc_samples=None`` uses the T the checkpoint's calibration was fitted with (the training
    config's ``uncertainty.mc_samples``; 16 for checkpoints that do not record it).
    ``local_radius`` (Å): ``max_force_std`` of the worst neighbourhood of this radius
    (``None``: the checkpoint's ``uncertainty.local_radius``; ``0``: of the worst atom).
    """

    implemented_properties = [
        "energy",
        "free_energy",
        "forces",
        "stress",
        keys.ENERGY_STD,
        keys.FORCES_STD,
        keys.MAX_FORCE_STD,
        "max_force_std_raw",
        keys.ENERGY_SAMPLES,
        keys.FORCES_SAMPLES,
    ]

    def __init__(
        self,
        checkpoint: str | Path | Checkpoint,
        device: str = "auto",
        mc_samples: int | None = None,
        seed: int = 0,
        prediction: str = "deterministic",
        uncertainty: bool = True,
        calibrated: bool = True,
        sample_index: int = 0,
        local_radius: float | None = None,
        bias_strength: float = 0.0,
        bias_width: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if prediction not in ("deterministic", "mc_mean", "sample"):
            raise ConfigError(
                f"prediction must be 'deterministic', 'mc_mean' or 'sample', got {prediction!r}"
            )
        self.device = resolve_device(device)
        self.checkpoint = (
            checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        )
        self.checkpoint.to(self.device)
        if mc_samples is None:
            mc_samples = self.checkpoint.mc_samples
        if uncertainty and not self.checkpoint.is_ensemble and mc_samples < 2:
            raise ConfigError(f"uncertainty needs mc_samples >= 2, got {mc_samples}")
        if prediction == "mc_mean" and not uncertainty:
            raise ConfigError("prediction 'mc_mean' needs uncertainty=True")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        # Å: σ of the worst neighbourhood (None: the checkpoint's setting; 0: the worst atom)
        self.local_radius = self.checkpoint.local_radius if local_radius is None else local_radius
        if self.local_radius and self.local_radius > self.checkpoint.cutoff:
            raise ConfigError(
                f"local_radius {self.local_radius} Å exceeds the model cutoff "
                f"{self.checkpoint.cutoff} Å"
            )
        if prediction == "sample" and not (
            self.checkpoint.is_ensemble or self.checkpoint.model.has_dropout
        ):
            raise ConfigError("prediction 'sample' needs a dropout model or a committee")
        self.prediction = prediction
        self.sample_index = int(sample_index)
        self.uncertainty = uncertainty
        self.calibration = self.checkpoint.calibration if calibrated else {"method": "none"}
        self.dtype = next(self.checkpoint.model.parameters()).dtype
        if bias_strength < 0 or bias_width <= 0:
            raise ConfigError(
                f"bias_strength must be >= 0 and bias_width > 0, got {bias_strength}, {bias_width}"
            )
        if bias_strength > 0:
            self._require_latent()
        self.bias_strength, self.bias_width = float(bias_strength), float(bias_width)

    # -- evaluation ----------------------------------------------------------------------
    def _graph(self, atoms_list: Sequence[Atoms]) -> Any:
        graphs = [
            atoms_to_graph(a, self.checkpoint.species, self.checkpoint.cutoff, self.dtype)
            for a in atoms_list
        ]
        return batch_graphs(graphs).to(self.device)

    def _require_latent(self) -> None:
        if self.checkpoint.latent is None:
            raise ConfigError(
                "a latent bias needs a checkpoint with its training atoms' features "
                "(train with uncertainty.latent_atoms)"
            )

    def predict(
        self,
        atoms_list: Sequence[Atoms],
        sample_indices: Sequence[int] | None = None,
        bias_strengths: Sequence[float] | None = None,
    ) -> list[dict[str, Any]]:
        """Results for several structures in one batched pass (one dict per structure).

        ``sample_indices``: with ``prediction="sample"``, the posterior sample that gives each
        structure its energy and forces (default: ``sample_index`` for all).
        ``bias_strengths``: the latent bias's A (eV) for each structure (default:
        ``bias_strength`` for all; 0 leaves a structure unbiased).
        """
        graph = self._graph(atoms_list)
        periodic = bool(graph.pbc.all())
        if any(bool(a.pbc.any()) != periodic for a in atoms_list):
            raise ConfigError("a batch must be all periodic or all molecular")
        ckpt = self.checkpoint
        pred: Prediction | None = None
        if ckpt.is_ensemble:
            pred = committee_predict(ckpt.models, graph, periodic, self.local_radius)
        elif self.uncertainty and ckpt.model.has_dropout:  # without dropout σ is exactly 0
            pred = mc_predict(
                ckpt.model, graph, self.mc_samples, self.seed, periodic,
                local_radius=self.local_radius, latent=ckpt.latent,
            )  # fmt: skip
        if self.prediction == "sample":
            if periodic:
                raise ConfigError("prediction 'sample' drives molecular MD only (no stress)")
            indices = sample_indices or [self.sample_index] * len(atoms_list)
            energy, forces = self._sample(graph, pred, indices)
            stress = None
        elif pred is None:
            out = compute_forces(ckpt.model, graph, create_graph=False, compute_stress=periodic)
            energy, forces, stress = out[keys.ENERGY], out[keys.FORCES], out.get(keys.STRESS)
        elif self.prediction == "mc_mean" and not ckpt.is_ensemble:
            energy, forces, stress = pred.energy_mean, pred.forces_mean, pred.stress
        else:
            energy, forces, stress = pred.energy, pred.forces, pred.stress
        bias = None
        strengths = [self.bias_strength] * len(atoms_list) if bias_strengths is None else [
            float(a) for a in bias_strengths]  # fmt: skip
        if len(strengths) != len(atoms_list) or min(strengths, default=0.0) < 0:
            raise ConfigError("bias_strengths: one value >= 0 per structure")
        if max(strengths, default=0.0) > 0:
            self._require_latent()
            strength = torch.as_tensor(strengths, dtype=torch.float64, device=graph.pos.device)
            bias = latent_bias(ckpt.model, graph, ckpt.latent, strength, self.bias_width)
            energy, forces = energy + bias[0].to(energy.dtype), forces + bias[1].to(forces.dtype)
        stats = apply_calibration(pred, self.calibration, graph.numbers) if pred else None
        results = []
        offsets = np.cumsum([0] + [len(a) for a in atoms_list])
        for b in range(len(atoms_list)):
            lo, hi = offsets[b], offsets[b + 1]
            r: dict[str, Any] = {
                "energy": float(energy[b]),
                "free_energy": float(energy[b]),
                "forces": forces[lo:hi].cpu().numpy().astype(np.float64),
            }
            if bias is not None:
                r["bias_energy"] = float(bias[0][b])
            if stress is not None:
                s = stress[b].cpu().numpy().astype(np.float64)
                r["stress"] = np.array([s[i, j] for i, j in _VOIGT])
            if self.prediction == "sample" and pred is not None:
                r[keys.POINT_FORCES] = pred.forces[lo:hi].cpu().numpy().astype(np.float64)
            if pred is not None and stats is not None:
                r[keys.ENERGY_STD] = float(stats[keys.ENERGY_STD][b])
                r[keys.FORCES_STD] = stats[keys.FORCES_STD][lo:hi].cpu().numpy().astype(np.float64)
                r[keys.MAX_FORCE_STD] = float(stats[keys.MAX_FORCE_STD][b])
                r["max_force_std_raw"] = float(pred.max_force_std[b])
                r[keys.ENERGY_SAMPLES] = pred.energy_samples[:, b].cpu().numpy()
                r[keys.FORCES_SAMPLES] = pred.forces_samples[:, lo:hi].cpu().numpy()
            else:
                r[keys.ENERGY_STD] = 0.0
                r[keys.FORCES_STD] = np.zeros(hi - lo)
                r[keys.MAX_FORCE_STD] = 0.0
                r["max_force_std_raw"] = 0.0
            results.append(r)
        return results

    def _sample(
        self, graph: Any, pred: Prediction | None, indices: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy (B,) and forces (n, 3) of posterior sample ``indices[b]`` for each graph b.

        Sample k is MC copy ``k mod T`` (the same dropout key as in :func:`mc_predict`, so the
        same mask whether or not σ is computed alongside) or member ``k mod M`` of a committee.
        """
        device = graph.pos.device
        if pred is not None:
            k = torch.as_tensor(indices, device=device) % pred.n_samples
            energy = pred.energy_samples[k, torch.arange(len(indices), device=device)]
            atoms = torch.arange(graph.pos.shape[0], device=device)
            return energy, pred.forces_samples[k[graph.batch], atoms]
        k = torch.as_tensor(indices, device=device) % self.mc_samples
        all_keys = DropoutKeys.for_samples(self.seed, self.mc_samples, 1, device)
        out = compute_forces(
            self.checkpoint.model, graph, create_graph=False,
            dropout=DropoutKeys(all_keys.graph_keys[k]),
        )  # fmt: skip
        return out[keys.ENERGY], out[keys.FORCES]

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] | None = None,
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        with torch.inference_mode(False):
            self.results = self.predict([self.atoms])[0]
        if not self.atoms.pbc.any():
            self.results.pop("stress", None)
