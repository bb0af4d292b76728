"""Every error lisa_dist shows a user, in one place: the CLI maps them to exit codes without importing the
package. A `UserError` is bad input (exit 2), found before any work starts where it can be; a `RunError`
is a run that could not go on (exit 1). Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class LisaDistError(Exception):
    """A failure the user is told about in one message, without a traceback."""

    exit_code = 1
    label = "error"
    """The word the CLI puts before the message."""


class UserError(LisaDistError, ValueError):
    """Bad input: the message names the key, file or value to change."""

    exit_code = 2


class RunError(LisaDistError, RuntimeError):
    """The run started and cannot continue; no checkpoint is lost or damaged."""

    exit_code = 1


class ConfigError(UserError):
    """A user mistake in the configuration; the message names the key."""


class LaunchError(UserError):
    """The launcher's environment (torchrun, deepspeed, accelerate, SLURM) is incomplete or malformed."""


class DataError(UserError):
    """The training data cannot be read or has a malformed record; the message names file and record."""


class CheckpointError(UserError):
    """A checkpoint is missing, incomplete or does not match the run."""


class UnsupportedModelError(UserError):
    """The model's architecture is one lisa_dist cannot train (its decoder stack is not found, or it is a
    mixture-of-experts or multimodal model)."""


class WeightsError(UserError):
    """A checkpoint's weight files are unreadable, incomplete or hold the wrong shapes."""


class ReportError(UserError):
    """`lisa-dist report` was pointed at a directory without a readable run."""


class CheckpointWriteError(RunError):
    """A checkpoint could not be written (a full disk, an I/O error, a quota); the earlier ones are whole."""


class RankDisagreementError(RunError):
    """Ranks hold different values for something they must agree on."""


class PeerFailureError(RunError):
    """A collective failed because another rank died or stopped answering."""


class LossScaleError(RunError):
    """fp16: overflows pushed the dynamic loss scale below train.min_loss_scale."""


class NonFiniteStepsError(RunError):
    """Too many steps in a row were skipped for non-finite values; the run cannot make progress."""


class FusedPathError(RunError):
    """A trainable parameter's fused (in-backward) update did not run: its gradient would be lost."""


class Preempted(LisaDistError):
    """A preemption signal (preempt.signals) stopped the run after a checkpoint of the step every rank agreed on;
    the exit status (preempt.exit_code) asks the scheduler to requeue it, and resume=auto continues exactly."""

    label = "stopped"

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
