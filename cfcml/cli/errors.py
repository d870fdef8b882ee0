"""How an error leaves the CLI: its exit status and its one line on stderr."""

from __future__ import annotations

from ..engine.errors import RunMismatch, TrainingFailed
from ..platform.redact import one_line
from ..platform.tracking_server import TrackingServerError
from ..util.errors import ConfigError

EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REFUSED = 3


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input is wrong (exit 2), not that cfcml is broken.

    The classes whose modules pull numpy, torch or MLflow are imported here, once an error is
    being classified: the CLI's start (and `cfcml --help`) imports none of them."""
    from ..datasets.cohort import CohortError
    from ..datasets.spec import SpecError
    from ..datasets.volume_cache import BlankSeriesError
    from ..engine.checkpoint import CheckpointError
    from ..models.text import TextEncoderUnavailable
    from ..platform.predict import PredictError
    from ..platform.registry import PromotionError

    # FileNotFoundError & co.: a path the user gave (data, run folder, checkpoint) is not there
    return (
        ConfigError,
        CohortError,
        SpecError,
        RunMismatch,
        TrainingFailed,
        TextEncoderUnavailable,
        BlankSeriesError,
        CheckpointError,
        PromotionError,
        PredictError,
        TrackingServerError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        UnicodeDecodeError,
    )


def error_line(e: BaseException) -> str:
    text = one_line(e, limit=1000)
    if isinstance(e, OSError) and e.filename and e.strerror:  # "[Errno 2] No such file..." → the path first
        text = one_line(f"{e.filename}: {e.strerror}", limit=1000)
    return text or type(e).__name__


def quiet_showwarning(show):
    """``warnings.showwarning`` without MLflow's advice to a model's author about type hints
    (MLflow puts its own "once" filter in front of any of ours, so it is dropped where shown)."""

    def showwarning(message, *rest, **kwargs):
        if "Add type hints to the `predict` method" not in str(message):
            show(message, *rest, **kwargs)

    return showwarning
