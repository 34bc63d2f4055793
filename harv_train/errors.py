"""Errors a user can act on.

A `UserError` carries a one-line message that says what is wrong and how to fix it. The command
line prints it as `error: <message>` and exits 2, with no traceback.
"""


class UserError(Exception):
    """Bad input or environment that the user can fix; the message is the whole report."""

    exit_code = 2


class ConfigError(UserError):
    """params.yaml or a --set override is invalid."""


class DataError(UserError):
    """The dataset on disk is missing, malformed, or does not match the params."""


class WeightsError(UserError):
    """Pretrained weights cannot be found or loaded offline."""


class CheckpointError(UserError):
    """A checkpoint is missing, not ours, or does not fit this run."""


class ArtifactsBusyError(UserError):
    """Another run holds the lock on the same artifacts_dir."""


class ExportError(UserError):
    """An exported model does not compute what the PyTorch model computes."""
