"""Typed configuration: one pydantic model per section, loaded from YAML.

Unknown keys and wrong types are errors that name the file and the key, e.g.
``configs/x.yaml: model.featurs: unknown key``. YAML is read with ``yaml.safe_load``.
Units: Å, eV, fs, K throughout; each field's description says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlforce.errors import ConfigError


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LargeDataDropout(Strict):
    """Where dropout goes in a model trained from scratch on many frames (production).

    Measured on ethanol (docs/benchmarks.md 22): trained on 500-1000 frames, dropout in the
    last block only (node 0.2, DropEdge 0.1) gives a more accurate model (300 K force error
    -15 to -32 %) whose σ ranks 300 K errors as well or better than dropout in every block;
    trained on a campaign's first ~100 labels, the same placement under-reads errors (a
    campaign trigger that stops too early, section 3a).
    """

    frames: int = Field(
        500, ge=1, description="applies when training from scratch on at least this many frames"
    )
    dropout_blocks: int | None = Field(1, ge=0, description="replaces model.dropout_blocks")
    node_dropout: float = Field(0.2, ge=0, lt=1, description="replaces model.node_dropout")
    edge_dropout: float = Field(0.1, ge=0, lt=1, description="replaces model.edge_dropout")
    local_radius: float | None = Field(
        3.0, gt=0, description="replaces uncertainty.local_radius (Å; σ of the worst "
        "neighbourhood, written into the checkpoint)",
    )  # fmt: skip
    max_epochs: int | None = Field(
        None, ge=1, description="replaces training.max_epochs (None: keep it)"
    )
    max_minutes: float | None = Field(
        None, gt=0, description="replaces training.max_minutes (None: keep it)"
    )
    latent_atoms: int | None = Field(
        None, ge=1, description="replaces uncertainty.latent_atoms (None: keep it)"
    )


class ModelConfig(Strict):
    """Architecture of the PaiNN-style message-passing network."""

    cutoff: float = Field(5.0, gt=0, description="neighbour cutoff radius (Å)")
    features: int = Field(64, ge=4, description="hidden features per atom")
    blocks: int = Field(3, ge=1, description="interaction (message + update) blocks")
    radial_basis: int = Field(16, ge=2, description="Bessel radial basis functions")
    node_dropout: float = Field(
        0.05, ge=0, lt=1, description="dropout rate on hidden node features in the blocks"
    )
    edge_dropout: float = Field(
        0.05, ge=0, lt=1, description="DropEdge rate: a dropped pair sends no message"
    )
    readout_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout rate on the hidden layer of the energy readout"
    )
    last_node_dropout: float | None = Field(
        None, ge=0, lt=1, description="node dropout rate in the last block (None: node_dropout)"
    )
    last_edge_dropout: float | None = Field(
        None, ge=0, lt=1, description="DropEdge rate in the last block (None: edge_dropout)"
    )
    dropout_blocks: int | None = Field(
        None, ge=0, description="dropout only in the last N blocks (None: every block)"
    )
    mc_dropout_blocks: int | None = Field(
        None, ge=0, description="MC dropout at inference only in the last N of the blocks "
        "trained with dropout (None: all of them); 1 ranks errors better (docs/benchmarks.md)",
    )  # fmt: skip
    large_data: LargeDataDropout | None = Field(
        None,
        description="dropout placement for models trained from scratch on many frames "
        "(None: the settings above whatever the data size)",
    )
    dtype: Literal["float32", "float64"] = "float32"


class TrainingConfig(Strict):
    """Optimisation of energy + force loss."""

    seed: int = 0
    max_epochs: int = Field(400, ge=1)
    max_minutes: float | None = Field(12.0, gt=0, description="wall-time cap (min)")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    lr_min: float = Field(2e-5, ge=0, description="final learning rate of the cosine schedule")
    warmup_epochs: int = Field(2, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    energy_weight: float = Field(1.0, ge=0, description="weight of (eV/atom)^2 energy loss")
    force_weight: float = Field(10.0, ge=0, description="weight of (eV/Å)^2 force loss")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(60, ge=1, description="early stopping: epochs without improvement")
    ema_decay: float | None = Field(0.99, ge=0, lt=1, description="EMA of weights (None: off)")
    swa_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="stochastic weight averaging: the last fraction of the schedule runs at "
        "the constant rate swa_lr and the returned model is the uniform average of its steps "
        "(0: off; the EMA at the best validation epoch is returned)",
    )
    swa_lr: float | None = Field(
        None, gt=0, description="learning rate of the averaging phase (None: lr / 5)"
    )
    deterministic_fraction: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="fraction of each batch's structures trained with dropout off, so the "
        "dropout-free model used in MD is fit directly, not only the stochastic samples",
    )
    ensemble: int = Field(1, ge=1, description="train a committee of N models (seeds differ)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: all cores)")


class GenerateConfig(Strict):
    """Reference MD that produces training and test data (`mlforce generate`)."""

    structure: str = Field("data/ethanol.xyz", description="starting structure file")
    temperatures: list[float] = Field(
        default_factory=lambda: [300.0, 400.0, 500.0, 600.0, 700.0, 800.0],
        description="Langevin temperatures of the training MD (K)",
    )
    frames: int = Field(1000, ge=1, description="training frames, spread over temperatures")
    interval: int = Field(20, ge=1, description="MD steps between stored frames")
    timestep_fs: float = Field(0.5, gt=0)
    friction: float = Field(0.01, gt=0, description="Langevin friction (1/fs)")
    equilibration_steps: int = Field(400, ge=0)
    seed: int = 1
    test_temperatures: list[float] = Field(
        default_factory=lambda: [300.0, 800.0], description="independent test trajectories (K)"
    )
    test_frames: int = Field(200, ge=1, description="frames per test trajectory")
    test_seed: int = 1001

    @model_validator(mode="after")
    def _positive_temperatures(self) -> GenerateConfig:
        for t in [*self.temperatures, *self.test_temperatures]:
            if not 0 < t < float("inf"):
                raise ValueError(f"temperatures must be finite and > 0 K, got {t}")
        return self


class DataConfig(Strict):
    """Where training data lives. Paths are relative to the working directory."""

    train: list[str] = Field(default_factory=lambda: ["datasets/ethanol_train.extxyz"])
    test: dict[str, str] = Field(
        default_factory=lambda: {
            "300K": "datasets/ethanol_test_300K.extxyz",
            "800K": "datasets/ethanol_test_800K.extxyz",
        }
    )
    generate: GenerateConfig = Field(default_factory=GenerateConfig)


class ReferenceConfig(Strict):
    """The reference (quantum-chemistry) calculator that produces labels.

    Per-structure ``atoms.info["charge"]`` and ``atoms.info["multiplicity"]`` (or ``"spin"``,
    read as 2S+1) take precedence over ``charge`` and ``multiplicity`` (xtb and pyscf only).
    """

    kind: Literal["xtb", "pyscf", "emt", "ase"] = "xtb"
    method: str | None = Field(
        None,
        description="xtb: GFN2-xTB (default), GFN1-xTB; pyscf: HF or a functional (default B3LYP)",
    )
    charge: int = Field(0, description="total charge (e)")
    multiplicity: int = Field(1, ge=1, description="spin multiplicity 2S+1")
    electronic_temperature: float = Field(300.0, gt=0, description="xtb electronic T (K)")
    max_iterations: int = Field(250, ge=1, description="SCF iteration limit (xtb, pyscf)")
    basis: str = Field("def2-svp", description="pyscf basis set")
    density_fit: bool = Field(False, description="pyscf: density fitting")
    calculator: str | None = Field(
        None, description="ase: import path 'module:Class' or 'module.Class'"
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="ase: constructor kwargs")
    timeout_s: float | None = Field(
        None, gt=0, description="wall-time limit per call (s); the call runs in a child process"
    )
    retries: int = Field(1, ge=0, description="extra attempts after a failure")
    fallback: dict[str, Any] = Field(
        default_factory=dict,
        description="settings that replace these on retries, e.g. {electronic_temperature: 1000}",
    )


class UncertaintyConfig(Strict):
    """Monte Carlo dropout at inference."""

    mc_samples: int = Field(16, ge=2, description="stochastic passes T, batched")
    seed: int = 0
    prediction: Literal["deterministic", "mc_mean", "sample"] = Field(
        "deterministic",
        description="forces used for MD: dropout off, the MC mean, or one posterior sample per "
        "walker (MC copy or committee member number = walker index: a fixed mask, a smooth "
        "potential; the walkers explore where plausible models disagree with the mean)",
    )
    calibration: Literal["none", "scale", "robust", "per_element"] = Field(
        "robust",
        description="σ -> expected error: robust (median) scale, likelihood scale, per element",
    )
    local_radius: float | None = Field(
        None,
        gt=0,
        description="Å: max_force_std is the largest per-atom σ after averaging each atom's σ "
        "over the atoms within this distance (the worst neighbourhood, less MC sampling noise "
        "than the worst atom; docs/benchmarks.md 19); None: the largest per-atom σ. At most "
        "model.cutoff",
    )
    latent_atoms: int | None = Field(
        None,
        ge=1,
        description="σ combined with the distance to the training atoms in the model's own "
        "features: per atom sqrt(σ_MC · d), then calibrated as usual (mlforce.latent; "
        "docs/benchmarks.md 27). The checkpoint keeps the features of at most this many "
        "training atoms per element (~0.25 MB per 1000). None: the MC spread alone",
    )
    label_samples: int | None = Field(
        64,
        ge=2,
        description="T for the σ recorded with each selected frame: re-scored by the round "
        "model with fresh masks (the walkers check, and the batch is chosen, with mc_samples); "
        "None: record the walkers' σ",
    )


class TriggerConfig(Strict):
    """When the model's uncertainty asks for the reference (see :mod:`mlforce.selection`)."""

    threshold: Literal["absolute", "calibrated", "adaptive"] = Field(
        "calibrated",
        description="absolute: raw max_force_std vs lower/upper; calibrated: calibrated "
        "max_force_std (an expected max force error); adaptive: lower follows a percentile "
        "of recent calibrated values (never below `lower`)",
    )
    lower: float = Field(0.3, gt=0, description="label at or above this σ (eV/Å)")
    upper: float = Field(2.0, gt=0, description="roll back at or above this σ (eV/Å)")
    adaptive_percentile: float = Field(99.0, gt=0, le=100)
    adaptive_factor: float = Field(1.2, gt=0, description="lower = factor x percentile")
    adaptive_window: int = Field(200, ge=10, description="recent checks for the percentile")
    check_every: int = Field(1, ge=1, description="MD steps between uncertainty checks")
    min_gap: int = Field(20, ge=0, description="minimum MD steps between two labels")
    label_budget: int = Field(50, ge=0, description="reference calls per walker, at most")
    audit_probability: float = Field(
        0.0, ge=0, le=1, description="chance that a trusted checked frame is labelled anyway"
    )
    mode: Literal["on_the_fly", "collect"] = Field(
        "on_the_fly",
        description="on_the_fly: label at once and continue with the reference forces; "
        "collect: keep the frame as a candidate and continue with the model",
    )
    after_candidate: Literal["continue", "restart"] = Field(
        "continue",
        description="collect mode, after a frame is kept as a candidate: continue on the "
        "model, or go back to the last trusted snapshot with new velocities (the walker stays "
        "where the model is trusted and keeps probing the edge of it, instead of running on "
        "into configurations that only a wrong model makes likely)",
    )
    on_upper: Literal["stop", "restart"] = Field(
        "restart", description="after a rollback: end the walker or continue with new velocities"
    )
    label_on_upper: bool = Field(True, description="label the frame that crossed `upper`")
    rollback_buffer: int = Field(10, ge=1, description="trusted snapshots kept for rollback")
    max_restarts: int = Field(3, ge=0, description="rollbacks before the walker ends")

    @model_validator(mode="after")
    def _ordered(self) -> TriggerConfig:
        if self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) must not exceed upper ({self.upper})")
        return self


class GuardConfig(Strict):
    """Physical guards: a walker that trips one is rolled back or ended, never labelled blindly."""

    min_distance: float = Field(0.5, gt=0, description="closest allowed interatomic distance (Å)")
    max_force: float = Field(20.0, gt=0, description="largest allowed atomic force (eV/Å)")
    max_temperature_factor: float = Field(
        5.0, gt=1, description="instantaneous T above factor x target trips the guard"
    )
    label_guard_frames: bool = Field(False, description="label frames that tripped a guard")
    keep_bonds: bool = Field(
        True,
        description="a walker whose covalent bonds differ from its start structure's has left "
        "the chemistry it started in (an ML hole, not a reaction): roll it back. Off for "
        "reactive chemistry and for metals",
    )
    bond_factor: float = Field(
        1.35,
        gt=1,
        description="a pair is bonded when closer than factor x the sum of covalent radii "
        "(ASE's); 800 K xTB ethanol MD stretches bonds to 1.21, non-bonded pairs reach 1.51",
    )


class BiasConfig(Strict):
    """Uncertainty-driven dynamics for campaign walkers: a bounded bias toward environments far
    from the training atoms in the model's features (:mod:`mlforce.bias`); needs
    ``uncertainty.latent_atoms``."""

    strength: float = Field(gt=0, description="A: the most the bias lowers the energy (eV)")
    width: float = Field(1.5, gt=0, description="B: latent distance scale (RMS over atoms)")
    rounds: int | None = Field(
        None, ge=1, description="the walkers of the first this many campaign rounds are biased, "
        "later rounds run on the model alone (None: every round)",
    )  # fmt: skip
    temperatures: list[float] | None = Field(
        None, min_length=1, description="only the walkers at these temperatures (K, from "
        "md.temperatures) are biased, the others run on the model alone (None: all walkers)",
    )  # fmt: skip

    def active(self, round_: int, temperature: float | None = None) -> bool:
        """Whether the walkers of campaign round ``round_`` (1-based) run with the bias; with
        ``temperature`` (K), whether the walker at that temperature does."""
        if self.rounds is not None and round_ > self.rounds:
            return False
        return temperature is None or self.temperatures is None or any(
            abs(temperature - t) < 1e-6 for t in self.temperatures)  # fmt: skip


class MDConfig(Strict):
    """Uncertainty-driven molecular dynamics (``replicas`` walkers per structure x temperature)."""

    structures: list[str] = Field(default_factory=lambda: ["data/ethanol.xyz"])
    temperatures: list[float] = Field(default_factory=lambda: [300.0], description="K")
    steps: int = Field(2000, ge=1, description="MD steps per walker")
    replicas: int = Field(
        1, ge=1, description="walkers per structure and temperature in each campaign round"
    )
    start: Literal["structure", "labelled", "continue"] = Field(
        "structure", description="where a campaign round's walkers start: structure: the start "
        "structure; labelled: a frame of the same composition drawn at random from the labels "
        "of earlier rounds (seed labels included), so that short walkers spread over what the "
        "campaign has already reached; continue: where the same walker's trajectory of the "
        "previous round ended (its last frame that no guard or rollback rejected), so that the "
        "rounds together make one long trajectory per walker, as a reference MD pool is",
    )  # fmt: skip
    timestep_fs: float = Field(0.5, gt=0)
    thermostat: Literal["langevin", "nve", "berendsen"] = "langevin"
    friction: float = Field(0.01, gt=0, description="Langevin friction (1/fs)")
    taut_fs: float = Field(100.0, gt=0, description="Berendsen time constant (fs)")
    seed: int = 0
    trajectory_every: int = Field(10, ge=1, description="MD steps between trajectory frames")
    lockstep: Literal["auto", "on", "off"] = Field(
        "auto", description="advance all walkers in lock-step, one batched model call per step "
        "(auto: on when the model runs on CUDA; on CPU walkers run one by one)",
    )  # fmt: skip
    triggers: TriggerConfig = Field(default_factory=TriggerConfig)
    guards: GuardConfig = Field(default_factory=GuardConfig)
    bias: BiasConfig | None = Field(
        None, description="campaign walkers: a latent-space bias toward new environments "
        "(null: plain MD)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _positive_temperatures(self) -> MDConfig:
        for t in self.temperatures:
            if not 0 < t < float("inf"):
                raise ValueError(f"temperatures must be finite and > 0 K, got {t}")
        return self


class SeedConfig(Strict):
    """The first round's labels, before any model exists."""

    source: Literal["md", "rattle", "file"] = Field(
        "md", description="md: frames of a short reference MD; rattle: randomly displaced "
        "copies of the start structures; file: an extxyz with reference labels",
    )  # fmt: skip
    frames: int = Field(20, ge=2, description="seed frames per start structure")
    temperature: float = Field(500.0, gt=0, description="seed MD temperature (K)")
    interval: int = Field(20, ge=1, description="seed MD steps between frames")
    rattle_std: float = Field(0.05, gt=0, description="rattle displacement std (Å)")
    file: str | None = Field(None, description="labelled extxyz for source: file")
    sampler: ReferenceConfig | None = Field(
        None, description="source md: a cheaper reference that drives the seed MD (e.g. "
        "{kind: xtb} for DFT labels); its frames are then labelled by the campaign's reference "
        "in parallel tasks. null: the campaign's reference drives the MD and its frames are "
        "the labels",
    )  # fmt: skip


class RunnerConfig(Strict):
    """Where the flow's tasks run."""

    kind: Literal["local", "dask"] = Field("local", description="local threads, or Dask")
    workers: int = Field(2, ge=1, description="local threads / Dask worker processes")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads each task uses (torch, and the OpenMP of xTB or PySCF called "
        "from it); None: the usable cores divided by workers, at least 1",
    )
    address: str | None = Field(None, description="an existing Dask scheduler address")


class CheckConfig(Strict):
    """Frames of a separate reference MD (the seed MD's temperature and driver, another random
    seed, frames ``interval`` steps apart), made once at the start and never trained on: the
    campaign's own unbiased accuracy check. A low trigger rate alone can come from a model that
    is confident and wrong where its own MD does not go (docs/benchmarks.md 24-25); while the
    campaign is quiet but fails this check, each round fills its label budget from the frames
    the walkers visited (trigger ``top_up``)."""

    frames: int = Field(40, ge=2, description="check frames per start structure")
    interval: int = Field(
        100,
        ge=1,
        description="MD steps between check frames: far enough apart to be independent "
        "samples (frames 10 fs apart over 0.4 ps could not tell a model 2x off target from a "
        "good one; 25 fs apart over 5 ps could: docs/benchmarks.md 25)",
    )
    temperature: float | None = Field(None, gt=0, description="K; None: the seed MD's")
    target_force_mae: float = Field(gt=0, description="eV/Å, on the check frames")


class ActiveLearningConfig(Strict):
    """Rounds of train -> simulate -> select -> label, until converged."""

    max_rounds: int = Field(6, ge=1)
    seed: SeedConfig = Field(default_factory=SeedConfig)
    labels_per_round: int = Field(30, ge=1, description="label budget of one round")
    total_label_budget: int = Field(400, ge=1, description="stop when the ledger holds this many")
    target_triggers_per_ps: float = Field(
        2.0, ge=0, description="converged when the trigger rate stays below this"
    )
    converged_rounds: int = Field(2, ge=1, description="... for this many consecutive rounds")
    check: CheckConfig | None = Field(
        None,
        description="an independent accuracy check for the stop rule: frames of a separate "
        "reference MD, never trained on; converged then also needs the round model's force "
        "MAE on them at most check.target_force_mae. None: the trigger rate alone",
    )
    audit_target: float | None = Field(
        None,
        gt=0,
        description="eV/Å: converged then also needs the round's audits (frames of the "
        "walkers' own MD labelled at random, md.triggers.audit_probability) to have a mean "
        "true largest per-atom force error at most this; while they do not, each round fills "
        "its label budget from the visited frames (trigger top_up). A model can be confident "
        "and wrong where its own MD goes (a 2-atom hole in a 96-atom box that σ does not see, "
        "docs/benchmarks.md 40), which reference-MD check frames never visit. None: no audit "
        "rule",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="ledger validation split")
    round_epochs: int | None = Field(
        None, ge=1, description="training epochs after round 1 (warm start); None: training"
    )
    final_epochs: int | None = Field(
        None, ge=1, description="warm-started epochs of the final model on every label (the "
        "one the campaign hands over); None: as a round",
    )  # fmt: skip
    test_files: list[str] = Field(
        default_factory=list, description="labelled extxyz files the final model is scored on"
    )
    selection: Literal["uncertainty", "uncertainty_latent", "uncertainty_fps", "random"] = Field(
        "uncertainty",
        description="which frames a round labels: uncertainty (flagged frames, an even share "
        "per walker, k-means in the model's learned features, the most uncertain typical "
        "frame of each cluster), uncertainty_latent (the same, each cluster's frame chosen by "
        "the geometric mean of σ and the frame's distance to the labelled atoms in the model's "
        "features, mlforce.latent), uncertainty_fps "
        "(highest σ, then farthest points on inverse distances), random (as many frames as "
        "uncertainty would take, uniformly from every frame the walkers visited)",
    )


class Config(Strict):
    """A whole mlforce job."""

    name: str = "mlforce"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    md: MDConfig = Field(default_factory=MDConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @model_validator(mode="after")
    def _bias_needs_latent(self) -> Config:
        if self.md.bias is not None and (
            self.uncertainty.latent_atoms is None or self.training.ensemble > 1
        ):
            raise ValueError(
                "md.bias needs the training atoms' features of one model: set "
                "uncertainty.latent_atoms and training.ensemble: 1"
            )
        bias = self.md.bias
        if bias is not None and bias.temperatures is not None:
            missing = [t for t in bias.temperatures
                       if not any(abs(t - m) < 1e-6 for m in self.md.temperatures)]  # fmt: skip
            if missing:
                raise ValueError(
                    f"md.bias.temperatures {missing} are not in md.temperatures "
                    f"{self.md.temperatures}: no walker would be biased there"
                )
        if self.active_learning.audit_target is not None and not (
            self.md.triggers.audit_probability > 0
        ):
            raise ValueError(
                "active_learning.audit_target needs audits: set md.triggers.audit_probability "
                "> 0 (the share of checked MD frames labelled at random)"
            )
        return self

    def for_training_frames(self, n_frames: int) -> Config:
        """This config as a single model trained from scratch on ``n_frames`` frames uses it:
        ``model.large_data`` applied when ``n_frames`` reaches its ``frames`` (and then
        removed), else unchanged. Committees (``training.ensemble`` > 1) keep their rates."""
        large = self.model.large_data
        if large is None or n_frames < large.frames or self.training.ensemble > 1:
            return self
        out = self.model_copy(deep=True)
        out.model = out.model.model_copy(
            update={
                "dropout_blocks": large.dropout_blocks,
                "node_dropout": large.node_dropout,
                "edge_dropout": large.edge_dropout,
                "large_data": None,
            }
        )
        update: dict[str, Any] = {"local_radius": large.local_radius}
        if large.latent_atoms is not None:
            update["latent_atoms"] = large.latent_atoms
        out.uncertainty = out.uncertainty.model_copy(update=update)
        schedule = {"max_epochs": large.max_epochs, "max_minutes": large.max_minutes}
        out.training = out.training.model_copy(
            update={k: v for k, v in schedule.items() if v is not None}
        )
        return out


def _format_validation_error(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"{source}: {key}: unknown key")
        else:
            parts.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a plain dict as a :class:`Config`; errors name ``source`` and the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted keys (``training.max_epochs``) set."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {p} is not a section")
        node[leaf] = value
    return out


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """Read a YAML file into a dict (safe_load), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return {} if data is None else data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML config; ``overrides`` are dotted keys applied first."""
    data = read_config_dict(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return config_from_dict(data, source=str(path))
