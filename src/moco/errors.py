"""Errors that the command line reports as one clear message instead of a traceback.

Every error says what is wrong and how to fix it; `moco` prints it and exits with status 2.
"""


class MocoError(Exception):
    """Base class of the errors a user can fix (bad input, bad config, wrong checkpoint)."""


class ConfigError(MocoError, ValueError):
    """A configuration value that cannot work, named with its allowed values."""


class DataError(MocoError):
    """A data set that is missing, empty or unreadable."""


class CheckpointError(MocoError):
    """A checkpoint that is missing, corrupt, or of another kind."""
