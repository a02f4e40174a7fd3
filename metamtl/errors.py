"""Error types raised by metamtl.

Every error the library raises on purpose derives from :class:`MetamtlError`, so callers (and the
CLI) can tell a user mistake, which gets a readable message, from a bug.  Each subclass also
derives from the builtin exception a Python user would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing data, ...), so ``except ValueError`` keeps working.

The one exception is :class:`FitInterrupted`: like ``KeyboardInterrupt`` it is not an
``Exception``, so a broad ``except Exception`` never swallows a stop request.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class MetamtlError(Exception):
    """Base class of every error raised on purpose by metamtl."""


class ConfigError(MetamtlError, ValueError):
    """A configuration value, key or combination of settings is invalid."""


class DataError(MetamtlError, ValueError):
    """A dataset is missing, malformed or cannot serve the requested tasks."""


class DataNotFoundError(DataError, FileNotFoundError):
    """Dataset files are not where they were looked for."""


class IntegrityError(DataError):
    """A file's checksum does not match the published one, or an archive is unsafe."""


class TaskError(MetamtlError, ValueError):
    """Task-sampling arguments cannot be satisfied by the dataset (ways, shots, queries)."""


class InputError(MetamtlError, ValueError):
    """Inputs given to a model or learner have the wrong shape, type or labels."""


class MissingDependencyError(MetamtlError, ImportError):
    """An optional package that a feature needs is not installed (the message says how to get it)."""


class CheckpointError(MetamtlError):
    """A checkpoint cannot be written, read, or does not match the current setup."""


class TrainingError(MetamtlError, RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class DistributedError(MetamtlError, RuntimeError):
    """A multi-process (torchrun) run is misconfigured, or another rank failed or timed out."""


class FitInterrupted(KeyboardInterrupt):
    """``MetaLearner.fit`` stopped on SIGINT (Ctrl-C) or SIGTERM.

    On the first signal fit finishes the current iteration, saves a resumable checkpoint and
    raises this; a second signal raises it at once (``checkpoint`` is then ``None``).

    Attributes:
        signum: the signal number; ``exit_code`` is the shell convention ``128 + signum``
            (130 for SIGINT, 143 for SIGTERM).
        iteration: completed meta-iterations.
        checkpoint: path of the resumable checkpoint written, or ``None``.
    """

    def __init__(self, message: str, signum: int, iteration: int, checkpoint=None) -> None:
        super().__init__(message)
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    """Build the error for an unknown registry name, listing the valid ones."""
    choices = sorted(str(c) for c in choices)
    return ConfigError(
        f"unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )
