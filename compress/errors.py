"""Errors a user can cause. The CLI prints them as one line plus a hint, without a traceback.

Exit codes: 0 success, 1 budget missed, 2 bad input (recipe, model, data, options, output folder),
3 an export does not compute what the compressed model computes, 4 a worker of a distributed run died, 5 the
Hugging Face Hub cannot be reached or refused an upload (checked before any compute; a finished run's folder stays).
"""

EXIT_OK = 0
EXIT_BUDGET_MISSED = 1
EXIT_BAD_INPUT = 2
EXIT_EXPORT_MISMATCH = 3
EXIT_WORKER_DIED = 4
EXIT_HUB = 5


class CompressError(Exception):
    """Base class of user-caused errors: a one-line message and an optional hint."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class RecipeError(CompressError):
    """The recipe file is missing, is not valid YAML, or does not match the schema."""


class PlanError(CompressError):
    """The passes cannot run in the order or combination given."""


class ModelError(CompressError):
    """The model cannot be found or loaded."""


class DataError(CompressError):
    """The calibration or evaluation data cannot be found or is too small."""


class OutputError(CompressError):
    """The output folder cannot be written (exists without --force, not writable)."""


class CheckpointError(CompressError):
    """A compressed checkpoint is missing files or is corrupted."""


class BudgetMissed(CompressError):
    """At least one budget of the recipe was missed."""

    exit_code = EXIT_BUDGET_MISSED


class ExportError(CompressError):
    """The model cannot be exported to ONNX (unsupported architecture or weight format)."""


class ExportMismatch(ExportError):
    """The ONNX export disagrees with the PyTorch model beyond the stated tolerance."""

    exit_code = EXIT_EXPORT_MISMATCH


class HubError(CompressError):
    """``--push-to-hub``: offline, no token, or the Hub refused the upload."""

    exit_code = EXIT_HUB
