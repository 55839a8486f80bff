"""The errors a user can cause, and what the command line prints for them.

Every error says what is wrong and how to fix it; `moco` prints it as one line, `moco: error: ...`,
and exits with the error's `exit_code` (2 for every user error; README, "Exit codes").
"""


class MocoError(Exception):
    """Base class of the errors a user can fix (bad input, bad config, wrong checkpoint)."""

    exit_code = 2


class ConfigError(MocoError, ValueError):
    """A configuration value that cannot work, named with its allowed values."""


class DataError(MocoError):
    """A data set that is missing, empty or unreadable."""


class CheckpointError(MocoError):
    """A checkpoint that is missing, corrupt, or of another kind."""


class DiskFull(MocoError):
    """A write that found no space; the file it was replacing is intact."""


class MissingExtra(MocoError):
    """A feature whose optional dependencies are not installed."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(f"{purpose} needs the {module} package, which is not installed: "
                         f"pip install 'momentum-contrast[{extra}]'")
        self.module, self.extra = module, extra


class NonFiniteLoss(MocoError):
    """A loss or gradient that became inf or NaN; `advice` names the settings that usually cause it."""

    def __init__(self, what: str, step: int, advice: str) -> None:
        super().__init__(f"the {what} became non-finite at step {step}; {advice}")
        self.step = step


class OutOfMemory(MocoError):
    """A training step that does not fit in memory, with the largest batch that does."""

    def __init__(self, batch: int, device: str, fits: int) -> None:
        hint = (f"the largest batch that fits is about {fits}: use --batch-size {fits} (the lr scales with it)"
                if fits else "not even a batch of bn_splits images fits: use a smaller model or image size")
        super().__init__(f"out of memory on {device} for a batch of {batch}; {hint}")


class Interrupted(MocoError):
    """A run stopped by SIGTERM or SIGINT after saving a checkpoint at a step boundary."""

    def __init__(self, signal_name: str, signum: int, checkpoint: str, step: int) -> None:
        super().__init__(f"{signal_name}: checkpoint saved at step {step} in {checkpoint}; "
                         "continue with --resume auto")
        self.exit_code = 128 + signum  # 143 for SIGTERM, 130 for SIGINT, as the shell reports them


class MocoWarning(UserWarning):
    """A diagnostic about a run that is probably not going to learn well, or a file that was passed over."""


def warn(message: str) -> None:
    """Issue a MocoWarning; `moco` prints it as `moco: warning: ...`."""
    import warnings

    warnings.warn(message, MocoWarning, stacklevel=3)
