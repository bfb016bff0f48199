"""The one place where planetseg's exceptions and warnings live.

Every error subclasses :class:`PlanetsegError` *and* the built-in exception it resembles, so
callers can catch either (``except FileNotFoundError`` keeps working). The CLI turns a
``PlanetsegError`` into a one-line message and a non-zero exit; any other exception is a bug and
keeps its traceback. Messages name what to change.
"""

from __future__ import annotations


class PlanetsegError(Exception):
    """Base class of every error planetseg raises on purpose."""

    #: Exit code the CLI uses for this error.
    exit_code: int = 1


class InvalidArgumentError(PlanetsegError, ValueError):
    """An argument or configuration value is malformed or out of range."""

    exit_code = 2


class WorkflowError(InvalidArgumentError):
    """A workflow file is unreadable, or a key in it is unknown, mistyped, missing or refused."""


class RunLockedError(PlanetsegError, RuntimeError):
    """Another run of the same workflow holds its lock and is alive."""


class CatalogNotFoundError(PlanetsegError, LookupError):
    """A catalog name, URL or path does not resolve to a catalog."""


class CollectionNotFoundError(PlanetsegError, LookupError):
    """A collection is not offered by the catalog searched."""


class NoStacCollectionError(PlanetsegError, LookupError):
    """A named data set exists but is not served by any STAC API (e.g. LROC NAC)."""


class CatalogReadError(PlanetsegError, OSError):
    """A local catalog or items file exists but cannot be read or parsed."""


class CatalogUnavailableError(PlanetsegError, ConnectionError):
    """A STAC API did not answer, or kept answering with errors, after all retries."""


class AssetReadError(PlanetsegError, OSError):
    """An asset (a COG behind an item) cannot be opened or its pixels cannot be read."""


class StoreMismatchError(PlanetsegError, FileExistsError):
    """An output store exists but holds something else than this run would write."""


class StoreCorruptError(PlanetsegError, OSError):
    """A store marked complete lost a chunk, or holds one that cannot be decoded."""


class OutputPathError(PlanetsegError, OSError):
    """An output path cannot be used as given.

    It holds what planetseg did not write (or an earlier output that needs ``--overwrite``), it
    is an input of the command, a file where a folder is wanted (or the reverse), or it is not
    writable.
    """

    exit_code = 2


class ClusterUnavailableError(PlanetsegError, ConnectionError):
    """A Dask scheduler address does not answer."""


class SchedulerUnavailableError(PlanetsegError, OSError):
    """A scheduler (SLURM, scrontab, cron) is missing, does not answer, or refused a request."""


class CheckpointError(PlanetsegError, OSError):
    """A checkpoint or exported model is missing, damaged, or does not fit the data."""


class TrainingInterrupted(PlanetsegError):
    """Training stopped on SIGINT or SIGTERM, after saving a checkpoint to resume from.

    Attributes:
        step: Steps done, and the step of the checkpoint ``--resume`` continues from.
        signum: The signal that stopped it; the exit code is ``128 + signum`` (130 for Ctrl-C).
    """

    def __init__(self, message: str, step: int, signum: int) -> None:
        super().__init__(message)
        self.step = step
        self.signum = signum
        self.exit_code = 128 + signum


class CRSError(PlanetsegError, ValueError):
    """A CRS is missing, unknown, or belongs to another body than expected."""


class MixedBodiesError(CRSError):
    """Data from two different bodies were combined (e.g. a Moon item in a Mars cube)."""


class PlanetsegWarning(UserWarning):
    """Base class of planetseg's warnings, so they can be filtered together."""


def first_line(exc: BaseException) -> str:
    """The first line of a third-party error's message (at most 300 characters), or its type.

    What a one-line planetseg error quotes of its cause.
    """
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
