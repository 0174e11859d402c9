"""Exceptions with messages meant for users: one line that names the file, key or atom at fault.

The CLI prints ``error: <message>`` for any :class:`MlforceError` and exits with status 2,
without a traceback.
"""


class MlforceError(Exception):
    """Base class of every error mlforce raises on purpose."""


class ConfigError(MlforceError):
    """A config file is missing, malformed, or has an unknown key or a wrong type."""


class StructureError(MlforceError):
    """A structure is unusable: unreadable file, NaN coordinates, unknown element, no labels."""


class CheckpointError(MlforceError):
    """A checkpoint is missing, unsafe to load, or from an incompatible version."""


class ReferenceFailure(MlforceError):
    """One reference calculation failed: it raised, did not converge, gave NaN, or timed out.

    ``reason`` is the one-line explanation stored as the ledger row's ``error``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreError(MlforceError):
    """The label ledger was given something it cannot store (bad provenance, missing labels)."""
