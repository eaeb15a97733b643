"""User-facing errors. The CLI prints their message (no traceback) and exits with status 2.

Every message names what is wrong and where (file, column, row, config key) and what to do about it.
"""


class RayOfflineError(Exception):
    """Base class of errors caused by the user's input rather than by a bug."""


class DataError(RayOfflineError):
    """A dataset source or a converted dataset is missing, unreadable or inconsistent."""


class DuplicatePartition(DataError):
    """`append` of a source whose transitions are already a partition of the dataset (same content hash)."""

    def __init__(self, message: str, partition: str) -> None:
        super().__init__(message)
        self.partition = partition


class ConfigError(RayOfflineError):
    """A configuration key, value or combination is invalid."""


class CheckpointError(RayOfflineError):
    """A checkpoint is missing, corrupted or does not fit the run it is loaded into."""


class DataWarning(UserWarning):
    """A conversion succeeded but changed or dropped something the user should know about (e.g. rows without a
    next observation). Also recorded in the partition's `notes` in the dataset metadata (_rayoffline.json); the
    CLI prints it."""
