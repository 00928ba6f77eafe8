"""The library's exceptions, in one place (docs/design.md §4).

Every module raises these instead of importing them from the command line; the CLI
(:func:`qgalore_dist.train.cli.main`) maps a :class:`UserError` to one ``error:`` line and exit status 2, and a
:class:`DistributedError` to one line and exit status 1. Each is a ``ValueError`` / ``RuntimeError`` as well, so
code that caught those before still does.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "DataError", "DistributedError", "DivergenceError", "ModelSpecError", "ReplicaMismatch",
           "UsageError", "UserError"]


class UserError(ValueError):
    """Something the user can fix: reported as one ``error:`` line, exit status 2, nothing written."""


class UsageError(UserError):
    """A bad command line, config file or flag combination."""


class ModelSpecError(UserError):
    """A model spec that names no shipped config, no existing path, or a malformed/unsupported config."""


class DataError(UserError):
    """A data source that is missing, empty or in an unreadable format (the message names the path)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupted, of another format, or does not fit the current run."""


class DivergenceError(RuntimeError):
    """Training stopped on non-finite losses / gradients (``--max-skipped-steps`` in a row): one ``error:`` line,
    exit status 3; the last checkpoint written (never a non-finite one) is kept."""


class DistributedError(RuntimeError):
    """Another rank died, hung or left: reported as one ``error:`` line, exit status 1 (not a user error)."""


class ReplicaMismatch(RuntimeError):
    """Raised on every rank by :func:`qgalore_dist.parallel.replicas.check_replicas` with ``strict=True`` when a
    replica differs."""
