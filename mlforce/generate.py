"""Reference data by Langevin MD with the reference calculator (GFN2-xTB by default).

``mlforce generate CONFIG --out datasets`` writes ``<name>_train.extxyz`` (frames spread over
the configured temperatures) and one independent ``<name>_test_<T>K.extxyz`` per test
temperature, each frame with the reference ``energy`` (eV) and ``forces`` (eV/Å).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

from mlforce.calculators.reference import build_reference
from mlforce.config import Config, GenerateConfig, ReferenceConfig
from mlforce.data import read_structures


def _labelled_copy(atoms: Atoms, temperature: float, step: int) -> Atoms:
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(
        frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
    )
    frame.info.update(md_temperature_K=temperature, md_step=step)
    return frame


def reference_md(
    start: Atoms,
    reference: ReferenceConfig,
    temperature: float,
    frames: int,
    gen: GenerateConfig,
    seed: int,
) -> list[Atoms]:
    """Langevin MD at ``temperature`` (K); ``frames`` snapshots every ``gen.interval`` steps."""
    return list(reference_md_frames(start, reference, temperature, frames, gen, seed))


def reference_md_frames(
    start: Atoms,
    reference: ReferenceConfig | Calculator,
    temperature: float,
    frames: int,
    gen: GenerateConfig,
    seed: int | Sequence[int],
    *,
    momenta: np.ndarray | None = None,
    first_step: int | None = None,
    on_step: Callable[[Atoms, int], None] | None = None,
) -> Iterator[Atoms]:
    """:func:`reference_md` one labelled snapshot at a time (each with ``info["md_step"]``).

    Snapshots are taken at steps ``equilibration_steps + k * interval`` (k >= 1).
    ``reference``: settings, or a calculator used as it is (with results it already holds for
    ``start``, the first step costs no call). To continue an earlier run, pass its state at
    step ``first_step`` as ``start`` with ``momenta`` (ASE units; None: new thermal
    velocities): no equilibration then, and the next snapshot is the next one on the grid.
    ``on_step(atoms, step)`` is called after every step (and at the start): a resume point.
    """
    atoms = start.copy()
    calc = reference if isinstance(reference, Calculator) else build_reference(reference, atoms)
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    if momenta is not None:
        atoms.set_momenta(momenta)
    else:
        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
        Stationary(atoms)
        if not atoms.pbc.any():
            ZeroRotation(atoms)
    dyn = Langevin(
        atoms,
        timestep=gen.timestep_fs * units.fs,
        temperature_K=temperature,
        friction=gen.friction / units.fs,
        fixcm=False,  # ASE's fixcm=True biases small systems; the drift of a molecule is harmless
        rng=rng,
    )
    step0 = 0 if first_step is None else first_step
    if on_step is not None:
        dyn.attach(lambda: on_step(atoms, step0 + dyn.nsteps), interval=1)
    eq, interval = gen.equilibration_steps, gen.interval
    snap = eq + interval * (max(0, (step0 - eq)) // interval + 1)
    step = step0
    for _ in range(frames):
        dyn.run(snap - step)
        step = snap
        snap += interval
        yield _labelled_copy(atoms, temperature, step)


def generate_datasets(
    config: Config,
    out_dir: str | Path,
    log: Callable[[str], None] | None = None,
    train: bool = True,
) -> dict[str, Path]:
    """Write the training (unless ``train=False``) and test sets of ``config.data.generate``."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    gen = config.data.generate
    start = read_structures(gen.structure)[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(gen.structure).stem
    paths: dict[str, Path] = {}

    per_t = np.full(len(gen.temperatures), gen.frames // len(gen.temperatures))
    per_t[: gen.frames % len(gen.temperatures)] += 1
    t0 = time.perf_counter()
    if train:
        frames: list[Atoms] = []
        for k, (temperature, n) in enumerate(zip(gen.temperatures, per_t)):
            frames += reference_md(start, config.reference, temperature, int(n), gen, gen.seed + k)
            log(
                f"train: {len(frames)}/{gen.frames} frames ({temperature:.0f} K done, "
                f"{time.perf_counter() - t0:.0f} s)"
            )
        paths["train"] = out / f"{stem}_train.extxyz"
        write(paths["train"], frames, format="extxyz")
    for k, temperature in enumerate(gen.test_temperatures):
        frames = reference_md(
            start, config.reference, temperature, gen.test_frames, gen, gen.test_seed + k
        )
        name = f"test_{temperature:.0f}K"
        paths[name] = out / f"{stem}_{name}.extxyz"
        write(paths[name], frames, format="extxyz")
        log(f"{name}: {len(frames)} frames ({time.perf_counter() - t0:.0f} s)")
    return paths
