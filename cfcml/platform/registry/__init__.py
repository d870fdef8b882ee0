"""Model registry promotion gate: move the ``champion`` alias only to a better model.

MLflow 3 promotes with aliases (stages are deprecated). A candidate model version is named
by version number or by alias (typically ``challenger``). The gate:

* **measures the artifact, not the search**: the value compared is the registered model's own
  metric on patients nothing in its study saw, read from the ``evaluation.json`` in the
  version's artifacts (``{"kind": "holdout" | "test_split" | "out_of_fold", "ids": [...],
  "data_digest": "...", "metrics": {...}}``, written at registration by scoring the package
  as ``cfcml predict`` does). Default metric ``auc``. A version of kind ``out_of_fold`` has no
  such measurement and is refused. The search's maximum (``val_*``, ``cv_*``, ``best_*``, a
  max over epochs and trials: a study with more trials would win without being better) and
  the members' own ``test_*`` metrics are never gate metrics (:func:`check_gate_metric`).
* **knows each metric's direction and range** (:func:`metric_spec`): ``auc``/``acc``/... are
  higher is better in [0, 1], ``loss`` lower is better, ``brier`` lower is better in [0, 2]
  (the multi-class score sums over classes). A metric it does not know is refused unless the
  caller says which way is better; a direction that contradicts a known metric is refused too.
  A value that is missing, NaN/inf or out of range is refused.
* **compares like with like**: both versions must have been measured the same way (same
  ``kind``), on the same patients (digest of the ``ids``), on the same data (``data_digest``)
  and under the same protocol (``cfcml.protocol_digest``, a param of the source run, else a
  version tag: :mod:`cfcml.platform.protocol_digest`); otherwise the request is refused,
  naming what differs.
* **serialises promotions of a model** (no lost update): a promotion holds a lock while it
  reads the champion, compares and moves the alias (:mod:`.lock`). Inside it the champion is
  still re-read right before the write, in case someone moved the alias without the gate.
* **audits every attempt** (:mod:`.audit`): each promotion, refusal or forced promotion is
  appended to the registered model's tags as ``promotion.log.<UTC time>.<random>``.

``force=True`` skips every check except that the candidate exists and is READY, and requires
a non-empty ``reason``; it is audited like every promotion.

The modules, one job each: :mod:`.errors` (the error), :mod:`.evaluation` (the
``evaluation.json`` document), :mod:`.metrics` (gate metrics, directions, ranges),
:mod:`.gate` (the comparison rules and refusal messages: pure functions over plain data),
:mod:`.versions` (reading versions, their evaluation and protocol from the server),
:mod:`.lock`, :mod:`.audit`, :mod:`.result` (what was decided) and :mod:`.promotion`
(:func:`promote`, tying them together).
"""

from .audit import AUDIT_PREFIX, audit_trail
from .errors import PromotionError
from .evaluation import EVALUATION_FILE, EVALUATION_PATHS, KINDS, OWN_KINDS, Evaluation, parse_evaluation
from .gate import Measurement, Protocol, Verdict, differences, gate_value, judge, parse_protocol
from .lock import LOCK_STALE_S, LOCK_SUFFIX, LOCK_WAIT_S, lock_name, promotion_lock
from .metrics import DEFAULT_METRIC, MetricSpec, check_gate_metric, metric_spec
from .promotion import MAX_ATTEMPTS, promote
from .result import PromotionResult
from .versions import (
    CHALLENGER,
    CHAMPION,
    current_champion,
    load_evaluation,
    measure,
    resolve_version,
    source_run,
    version_protocol,
)

__all__ = [
    "AUDIT_PREFIX",
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_METRIC",
    "EVALUATION_FILE",
    "EVALUATION_PATHS",
    "KINDS",
    "LOCK_STALE_S",
    "LOCK_SUFFIX",
    "LOCK_WAIT_S",
    "MAX_ATTEMPTS",
    "OWN_KINDS",
    "Evaluation",
    "Measurement",
    "MetricSpec",
    "PromotionError",
    "PromotionResult",
    "Protocol",
    "Verdict",
    "audit_trail",
    "check_gate_metric",
    "current_champion",
    "differences",
    "gate_value",
    "judge",
    "load_evaluation",
    "lock_name",
    "measure",
    "metric_spec",
    "parse_evaluation",
    "parse_protocol",
    "promote",
    "promotion_lock",
    "resolve_version",
    "source_run",
    "version_protocol",
]
