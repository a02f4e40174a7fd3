"""Error types raised by metamtl, and helpers that build their messages.

Every error the library raises on purpose derives from :class:`MetamtlError`, so callers (and the
CLI) can tell a user mistake, which gets a readable message, from a bug.  Each subclass also
derives from the builtin exception a Python user would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing data, ...), so ``except ValueError`` keeps working.

The one exception is :class:`FitInterrupted`: like ``KeyboardInterrupt`` it is not an
``Exception``, so a broad ``except Exception`` never swallows a stop request.
"""
from __future__ import annotations

import codecs
import difflib
import re
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

    def __reduce__(self):
        # ``args`` holds the message only: rebuild with every argument, so copies and pickles (a fit
        # interrupted in a worker process, sent back to the parent) keep signum, iteration and checkpoint
        return type(self), (str(self), self.signum, self.iteration, self.checkpoint), self.__dict__


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_settings(kind: str, given: Iterable[str], accepted: Iterable[str]) -> ConfigError | None:
    """The error for settings of ``kind`` (e.g. ``"model 'conv4'"``) not in ``accepted``, with the
    closest accepted name and the list; ``None`` when every one is accepted."""
    accepted = sorted(set(map(str, accepted)) - {"name"})
    unknown = sorted(set(map(str, given)) - set(accepted) - {"name"})
    if not unknown:
        return None
    # ``name`` picks the component itself, so it is always a valid key of its section
    return ConfigError(f"{kind} does not take {unknown}.{did_you_mean(unknown[0], accepted + ['name'])} "
                       f"It accepts {accepted} (besides name).")


def unexpected_keyword(exc: TypeError) -> str | None:
    """The name in a ``TypeError`` "got an unexpected keyword argument 'x'", else ``None``."""
    match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
    return match.group(1) if match else None


#: what a ``torch.optim`` constructor raises for a malformed setting (``betas: [0.9]`` gives an
#: IndexError, a mapping of betas a KeyError): callers turn them into a :class:`ConfigError`
BAD_SETTING_ERRORS = (TypeError, ValueError, IndexError, KeyError)


def setting_error_text(exc: Exception) -> str:
    """What a :data:`BAD_SETTING_ERRORS` error from an optimizer's constructor says, readably."""
    if isinstance(exc, (IndexError, KeyError)):
        return (f"{type(exc).__name__} {exc} reading a setting: a setting made of several numbers has the wrong "
                "length or is a mapping (betas is a list of two numbers, e.g. [0.9, 0.999])")
    return str(exc)


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> ConfigError:
    """Build the error for an unknown registry name, listing the valid ones."""
    choices = sorted(str(c) for c in choices)
    return ConfigError(
        f"unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}."
    )


# -- text files users hand to metamtl (YAML configs, CSV lists) ------------------------------------

#: byte-order marks that name their encoding unambiguously (longest first: UTF-32-LE starts like UTF-16-LE)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, where: str, error: type[Exception]) -> str:
    """``data`` as text: UTF-8, or UTF-8/16/32 announced by a byte-order mark.

    Raises ``error`` (e.g. :class:`~metamtl.errors.ConfigError`) naming ``where``, the line and the
    bytes that are not UTF-8, and how to re-save the file.
    """
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start:min(exc.end, exc.start + 8)]
        hint = " (it looks like Latin-1/Windows-1252 text)" if encoding == "utf-8" and _looks_single_byte(data) else ""
        raise error(
            f"{where} is not {encoding.upper().replace('-SIG', '')} text: line {line}, byte offset {exc.start} "
            f"holds {bad!r}, which is not valid {exc.encoding}{hint}; save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8 FILE > NEW`) and try again"
        ) from None


def _looks_single_byte(data: bytes) -> bool:
    """Whether the non-ASCII bytes look like a single-byte encoding (no UTF-8 lead/continuation pattern)."""
    high = [b for b in data[:65536] if b >= 0x80]
    return bool(high) and sum(0x80 <= b < 0xC0 for b in high) < len(high) / 2
