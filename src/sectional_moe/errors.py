"""Errors a user can act on.

Every check that can fail on user input raises :class:`ConfigError` with one line that names the
config key, the bad value and the fix. ``train.py`` prints that line (no traceback) and exits with
status 2 before any data is loaded or any model is built.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value, caught before any compute starts.

    Args:
        key: the dotted config key at fault (``"experts"``, ``"data.path"``...).
        message: what is wrong and how to fix it, in one sentence.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}")


class DataError(ConfigError):
    """The data a config points to is missing, empty, too short or unreachable."""


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt or does not match the configured model."""


class StaleRunError(ConfigError):
    """The run directory holds a finished run of a different config; that run's files stay untouched."""


class RunLockedError(ConfigError):
    """Another live process holds the run directory's lock; nothing in the directory was touched."""


class StorageError(ConfigError):
    """A file could not be written (no space left, file-size limit); the previous version is intact."""
