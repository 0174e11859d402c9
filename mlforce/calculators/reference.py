"""Reference calculators built from config, and one failure-safe reference call.

Kinds (``ReferenceConfig.kind``):

- ``xtb``: GFN2-xTB (or GFN1-xTB) through ``tblite.ase.TBLite``, quiet (verbosity 0).
- ``pyscf``: HF or DFT energy and analytic gradient through PySCF (:class:`PySCFCalculator`);
  molecules only.
- ``emt``: ASE's EMT (metals; for tests and demos).
- ``ase``: any ASE calculator by import path (``calculator: "module:Class"``) and ``kwargs``.

:func:`compute_reference` runs one attempt and turns every way a call can go wrong (an exception,
an unconverged SCF, NaN, a wall-time limit) into :class:`mlforce.errors.ReferenceFailure`.
Bad settings raise :class:`mlforce.errors.ConfigError` naming the setting.
"""

from __future__ import annotations

import importlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import (
    BaseCalculator,
    CalculationFailed,
    Calculator,
    all_changes,
)
from ase.units import Bohr, Hartree
from pydantic import ValidationError

from mlforce.config import ReferenceConfig
from mlforce.errors import ConfigError, MlforceError, ReferenceFailure

XTB_METHODS = ("GFN2-xTB", "GFN1-xTB", "IPEA1-xTB")
DEFAULT_METHOD = {"xtb": "GFN2-xTB", "pyscf": "B3LYP"}
_NEEDS_CALCULATOR = "required when reference.kind is 'ase' (an import path 'module:Class')"
CHILD_START_TIMEOUT_S = 120.0  # s: starting the child is not counted in reference.timeout_s
PYSCF_CONV_TOL = 1e-10  # Ha; tight, so that analytic gradients match finite differences


# --- settings ---------------------------------------------------------------------------------


def _config_error(where: str, err: ValidationError) -> ConfigError:
    parts = []
    for e in err.errors():
        key = ".".join([where, *(str(p) for p in e["loc"])])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{key}: {msg} (got {e.get('input')!r})")
    return ConfigError("; ".join(parts))


def as_reference_config(cfg: ReferenceConfig | Mapping[str, Any]) -> ReferenceConfig:
    """Accept a :class:`ReferenceConfig` or a plain dict; a bad dict raises ConfigError."""
    if isinstance(cfg, ReferenceConfig):
        return cfg
    try:
        return ReferenceConfig.model_validate(dict(cfg))
    except ValidationError as err:
        raise _config_error("reference", err) from None


def with_fallback(cfg: ReferenceConfig) -> ReferenceConfig:
    """The settings used on retries: ``cfg`` with ``cfg.fallback`` applied (no fallback left)."""
    if not cfg.fallback:
        return cfg
    unknown = sorted(
        k for k in cfg.fallback if k not in ReferenceConfig.model_fields or k == "fallback"
    )
    if unknown:
        raise ConfigError(f"reference.fallback: unknown setting(s) {', '.join(unknown)}")
    try:
        return ReferenceConfig.model_validate({**cfg.model_dump(), **cfg.fallback, "fallback": {}})
    except ValidationError as err:
        raise _config_error("reference.fallback", err) from None


def method_of(cfg: ReferenceConfig) -> str | None:
    """The method actually used: ``cfg.method`` or the kind's default (None for emt/ase)."""
    return cfg.method or DEFAULT_METHOD.get(cfg.kind)


def _import_calculator(path: str, where: str = "reference.calculator") -> type:
    """Import ``module:Class`` or ``module.Class``; ConfigError naming ``where`` if it fails."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ConfigError(f"{where}: {path!r} is not an import path 'module:Class'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"{where}: cannot import {path!r} ({type(err).__name__}: {err})"
        ) from None
    # Only an ASE calculator class: a config must not be able to call any function it names
    # (``os:system`` with ``kwargs: {command: ...}`` would run a shell command).
    if not (isinstance(obj, type) and issubclass(obj, BaseCalculator)):
        raise ConfigError(
            f"{where}: {path!r} is not an ASE calculator class (a subclass of "
            "ase.calculators.calculator.Calculator)"
        )
    return obj


def _check(cfg: ReferenceConfig, where: str) -> None:
    method = method_of(cfg)
    if cfg.kind != "ase" and (cfg.calculator or cfg.kwargs):
        key = "calculator" if cfg.calculator else "kwargs"
        raise ConfigError(
            f"{where}.{key}: only used when reference.kind is 'ase' (kind is {cfg.kind!r})"
        )
    if cfg.kind == "xtb" and method not in XTB_METHODS:
        raise ConfigError(
            f"{where}.method: unknown xtb method {method!r} "
            f"(expected one of {', '.join(XTB_METHODS)})"
        )
    if cfg.kind == "pyscf":
        from pyscf import dft, gto

        try:
            dft.libxc.parse_xc(method)
        except (KeyError, ValueError):
            raise ConfigError(f"{where}.method: unknown functional {method!r} for pyscf") from None
        try:
            with warnings.catch_warnings():  # pyscf suggests basis-set-exchange on a miss
                warnings.simplefilter("ignore")
                gto.basis.load(cfg.basis, "H")
        except Exception:
            raise ConfigError(f"{where}.basis: unknown basis set {cfg.basis!r} for pyscf") from None
    if cfg.kind in ("emt", "ase") and cfg.method:
        raise ConfigError(f"{where}.method: not used when reference.kind is {cfg.kind!r}")
    if cfg.kind == "ase":
        if not cfg.calculator:
            raise ConfigError(f"{where}.calculator: {_NEEDS_CALCULATOR}")
        cls = _import_calculator(cfg.calculator, f"{where}.calculator")
        try:
            cls(**cfg.kwargs)
        except TypeError as err:
            raise ConfigError(f"{where}.kwargs: rejected by {cfg.calculator}: {err}") from None


def validate_reference(cfg: ReferenceConfig | Mapping[str, Any]) -> ReferenceConfig:
    """Check the settings (and the fallback settings) once, before anything is labelled.

    Raises ConfigError naming the setting: unknown method/functional/basis, kind ``ase`` without
    ``calculator``, an import path that does not import, kwargs the class rejects.
    """
    cfg = as_reference_config(cfg)
    _check(cfg, "reference")
    if cfg.fallback:
        _check(with_fallback(cfg), "reference.fallback")
    return cfg


def charge_and_multiplicity(cfg: ReferenceConfig, atoms: Atoms | None = None) -> tuple[int, int]:
    """Total charge (e) and multiplicity 2S+1: ``atoms.info`` wins over the config.

    ``atoms.info`` keys: ``charge``, and ``multiplicity`` or ``spin`` (both read as 2S+1).
    """
    info = atoms.info if atoms is not None else {}
    charge, mult = (
        info.get("charge", cfg.charge),
        info.get("multiplicity", info.get("spin", cfg.multiplicity)),
    )
    try:
        charge_i, mult_i = int(charge), int(mult)
        if charge_i != charge or mult_i != mult or mult_i < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(
            f"atoms.info charge={charge!r} multiplicity={mult!r}: need an integer charge and an "
            "integer multiplicity >= 1"
        ) from None
    return charge_i, mult_i


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown version"


def reference_description(
    cfg: ReferenceConfig | Mapping[str, Any], atoms: Atoms | None = None
) -> str:
    """Method string with its settings, stored as the ``reference`` provenance of a label.

    With ``atoms``, charge and multiplicity are those resolved for that structure.
    """
    cfg = as_reference_config(cfg)
    if cfg.kind == "xtb":
        charge, mult = charge_and_multiplicity(cfg, atoms)
        return (
            f"xtb {method_of(cfg)} charge={charge} multiplicity={mult} "
            f"electronic_temperature={cfg.electronic_temperature:g}K "
            f"max_iterations={cfg.max_iterations} (tblite {_version('tblite')})"
        )
    if cfg.kind == "pyscf":
        charge, mult = charge_and_multiplicity(cfg, atoms)
        df = " density_fit" if cfg.density_fit else ""
        return (
            f"pyscf {method_of(cfg)}/{cfg.basis}{df} charge={charge} multiplicity={mult} "
            f"max_iterations={cfg.max_iterations} conv_tol={PYSCF_CONV_TOL:g}Ha "
            f"(pyscf {_version('pyscf')})"
        )
    if cfg.kind == "emt":
        return f"emt (ase {_version('ase')})"
    return f"ase {cfg.calculator} {json.dumps(cfg.kwargs, sort_keys=True, default=str)}"


# --- calculators ------------------------------------------------------------------------------


class PySCFCalculator(Calculator):
    """HF/DFT energy (eV) and analytic forces (eV/Å) from PySCF, for molecules (no periodic cell).

    DFT gradients include the grid response, so forces are the exact derivative of the energy
    (to about 1e-5 eV/Å). An SCF that does not converge raises ``CalculationFailed``.
    Open shells (multiplicity > 1) use unrestricted HF/KS.
    """

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]
    default_parameters: ClassVar[dict[str, Any]] = {
        "method": "B3LYP",
        "basis": "def2-svp",
        "charge": 0,
        "multiplicity": 1,
        "density_fit": False,
        "max_iterations": 250,
        "conv_tol": PYSCF_CONV_TOL,
    }

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Run the SCF and the gradient for ``self.atoms``; results in eV and eV/Å."""
        from pyscf import dft, gto, scf

        super().calculate(atoms, properties, system_changes)
        if self.atoms.pbc.any():
            raise ConfigError(
                "reference.kind 'pyscf': periodic cells are not supported (pbc must be False)"
            )
        p = self.parameters
        mol = gto.M(
            atom=list(zip(self.atoms.get_chemical_symbols(), self.atoms.positions, strict=True)),
            unit="Angstrom",
            basis=p.basis,
            charge=p.charge,
            spin=p.multiplicity - 1,
            verbose=0,
        )
        is_hf = p.method.upper() in ("HF", "RHF", "UHF")
        mf = scf.HF(mol) if is_hf else dft.KS(mol, xc=p.method)
        if p.density_fit:
            mf = mf.density_fit()
        mf.max_cycle, mf.conv_tol, mf.verbose = p.max_iterations, p.conv_tol, 0
        energy = mf.kernel()
        if not mf.converged:
            raise CalculationFailed(f"PySCF SCF not converged in {p.max_iterations} cycles")
        grad = mf.nuc_grad_method()
        if not is_hf:
            grad.grid_response = True
        gradient = grad.kernel()
        self.results["energy"] = self.results["free_energy"] = float(energy) * Hartree
        self.results["forces"] = -np.asarray(gradient) * Hartree / Bohr


def build_reference(
    cfg: ReferenceConfig | Mapping[str, Any], atoms: Atoms | None = None
) -> Calculator:
    """An ASE calculator for the configured reference.

    ``atoms`` (optional) supplies per-structure charge/multiplicity from ``atoms.info`` and is
    checked against the kind (pyscf: no periodic cell). Raises ConfigError naming the setting.
    """
    cfg = as_reference_config(cfg)
    if cfg.kind == "xtb":
        from tblite.ase import TBLite

        charge, mult = charge_and_multiplicity(cfg, atoms)
        return TBLite(
            method=method_of(cfg),
            charge=charge,
            multiplicity=mult,
            electronic_temperature=cfg.electronic_temperature,
            max_iterations=cfg.max_iterations,
            verbosity=0,
        )
    if cfg.kind == "pyscf":
        if atoms is not None and atoms.pbc.any():
            raise ConfigError(
                "reference.kind 'pyscf': periodic cells are not supported "
                f"(structure {atoms.get_chemical_formula()} has pbc={atoms.pbc.tolist()})"
            )
        charge, mult = charge_and_multiplicity(cfg, atoms)
        return PySCFCalculator(
            method=method_of(cfg),
            basis=cfg.basis,
            charge=charge,
            multiplicity=mult,
            density_fit=cfg.density_fit,
            max_iterations=cfg.max_iterations,
        )
    if cfg.kind == "emt":
        from ase.calculators.emt import EMT

        return EMT()
    if not cfg.calculator:
        raise ConfigError(f"reference.calculator: {_NEEDS_CALCULATOR}")
    cls = _import_calculator(cfg.calculator)
    try:
        return cls(**cfg.kwargs)
    except TypeError as err:
        raise ConfigError(f"reference.kwargs: rejected by {cfg.calculator}: {err}") from None


# --- one failure-safe call --------------------------------------------------------------------


@dataclass
class ReferenceResult:
    """One successful reference call.

    energy: eV; forces: (n, 3) eV/Å; seconds: wall time of the call (s);
    reference: the method string with settings (:func:`reference_description`).
    """

    energy: float
    forces: np.ndarray
    seconds: float
    reference: str


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or "(no message)"
    return f"{type(err).__name__}: {text}"[:1000]


def _evaluate(atoms: Atoms, cfg: ReferenceConfig) -> tuple[float, np.ndarray]:
    calc = build_reference(cfg, atoms)
    work = atoms.copy()
    work.calc = calc
    try:
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(apply_constraint=False), dtype=float)
    except MlforceError:
        raise
    except Exception as err:
        raise ReferenceFailure(_one_line(err)) from err
    if forces.shape != (len(atoms), 3):
        raise ReferenceFailure(f"forces have shape {forces.shape}, expected ({len(atoms)}, 3)")
    if not (math.isfinite(energy) and np.isfinite(forces).all()):
        raise ReferenceFailure("non-finite energy or forces (NaN or inf)")
    return energy, forces


def _child_main(
    conn: Any, atoms: Atoms, cfg: ReferenceConfig, path: list[str], threads: int
) -> None:
    """Entry of the child process that runs a call under a wall-time limit.

    ``threads``: the caller's thread count, for the OpenMP of tblite or PySCF (read when they
    load, so set before they are imported here).
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # OpenMP already loaded (by the forkserver's imports)
        sys.modules["torch"].set_num_threads(threads)
    if "pyscf.lib" in sys.modules:  # preloaded: its OpenMP read the server's environment
        sys.modules["pyscf.lib"].num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads, user_api="blas")  # numpy's OpenBLAS: a thread a core
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # its own process group: a timeout also kills programs it started
    sys.path[:] = path  # import paths of the parent, for kind 'ase'
    conn.send(("started", None))  # the parent starts the clock now, not at process start
    try:
        conn.send(("ok", _evaluate(atoms, cfg)))
    except ConfigError as err:
        conn.send(("config", str(err)))
    except ReferenceFailure as err:
        conn.send(("failure", err.reason))
    except BaseException as err:  # anything else still reaches the parent as a reason
        conn.send(("failure", _one_line(err)))
    conn.close()


_CONTEXT: Any = None


# Modules the forkserver imports once for every child (importing PySCF's DFT and gradient
# modules costs about 1 s, which each label paid again before). Importing runs no OpenMP
# region, so forking after it is safe; each child sets its thread count at run time.
_PRELOAD: dict[str, list[str]] = {
    "pyscf": [
        "pyscf.gto",
        "pyscf.scf",
        "pyscf.dft",
        "pyscf.df",
        "pyscf.grad.rks",
        "pyscf.grad.uks",
        "pyscf.df.grad.rks",
        "pyscf.df.grad.uks",
    ],
}


def _context(kind: str | None = None) -> Any:
    # forkserver, not fork: forking a parent that has run OpenMP code (tblite, PySCF) can hang
    # the child in libgomp. The server is a fresh process; each call forks from it (~40 ms).
    # ``kind``: the reference kind of the first call, whose modules the server preloads.
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload([__name__, *_PRELOAD.get(kind or "", [])])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def _kill(proc: Any) -> None:
    if proc.is_alive():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (AttributeError, OSError):  # no process group (yet, or on this platform)
            proc.kill()
    proc.join()


def _receive(receiver: Any, proc: Any, limit: float, what: str) -> tuple[str, Any]:
    if not receiver.poll(limit):
        suffix = " (reference.timeout_s)" if what.startswith("timed out") else ""
        raise ReferenceFailure(f"{what} {limit:g} s{suffix}")
    try:
        return receiver.recv()
    except EOFError:
        proc.join(5)
        raise ReferenceFailure(f"reference process died (exit code {proc.exitcode})") from None


def _evaluate_in_child(atoms: Atoms, cfg: ReferenceConfig) -> tuple[float, np.ndarray]:
    ctx = _context(cfg.kind)
    receiver, sender = ctx.Pipe(duplex=False)
    import torch  # the caller's thread count (mlforce.device.set_threads) goes to the child

    args = (sender, atoms, cfg, list(sys.path), torch.get_num_threads())
    proc = ctx.Process(target=_child_main, args=args, daemon=True)
    proc.start()
    sender.close()
    try:
        _receive(receiver, proc, CHILD_START_TIMEOUT_S, "reference process did not start in")
        status, payload = _receive(receiver, proc, cfg.timeout_s, "timed out after")
    finally:
        _kill(proc)
        receiver.close()
    if status == "config":
        raise ConfigError(payload)
    if status == "failure":
        raise ReferenceFailure(payload)
    return payload


def compute_reference(atoms: Atoms, cfg: ReferenceConfig | Mapping[str, Any]) -> ReferenceResult:
    """One attempt of the reference on ``atoms`` (not modified).

    With ``cfg.timeout_s`` set, the call runs in a child process that is killed at the limit.
    Raises ReferenceFailure (exception, unconverged SCF, NaN/inf, wrong shape, timeout) or
    ConfigError (settings unusable for this structure).
    """
    cfg = as_reference_config(cfg)
    reference = reference_description(cfg, atoms)
    start = time.perf_counter()
    if cfg.timeout_s is None:
        energy, forces = _evaluate(atoms, cfg)
    else:
        energy, forces = _evaluate_in_child(atoms, cfg)
    return ReferenceResult(energy, forces, time.perf_counter() - start, reference)
