"""Tracking-server outages: bookkeeping retried with bounded backoff, metrics delivered late
rather than never.

The tracking server may go away for a while (restarted, redeployed, its machine lost):
:func:`call_with_retry` retries a bookkeeping step with bounded exponential backoff, and
:class:`MetricSender` delivers a run's per-epoch metrics from a background thread, holding what
the server did not take and sending it, in order and with its original timestamps, once it
answers again; what is still undelivered when the run's process ends is counted in the run's
``cfcml.metrics_lost`` tag (and a warning), never dropped silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from .redact import one_line

logger = logging.getLogger(__name__)

TAG_METRICS_LOST = "cfcml.metrics_lost"  # per-epoch metric values the server never received


def call_with_retry(
    fn: Callable[[], object],
    what: str,
    *,
    deadline_s: float = 300.0,
    first_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
):
    """``fn()``, called again after each failure with exponential backoff (``first_delay_s``,
    doubling, at most ``max_delay_s``) until it succeeds or ``deadline_s`` has passed; then the
    last error is raised. For idempotent bookkeeping (look a run up before creating it)."""
    deadline, delay, attempt = clock() + deadline_s, first_delay_s, 1
    while True:
        try:
            return fn()
        except Exception as e:
            left = deadline - clock()
            if left <= 0:
                raise
            logger.warning(
                "MLflow: could not %s (attempt %d: %s); retrying in %.0f s",
                what,
                attempt,
                one_line(e, limit=200),
                min(delay, left),
            )
            sleep(min(delay, left))
            delay, attempt = min(2 * delay, max_delay_s), attempt + 1


class MetricSender:
    """Delivers one run's metrics (and tags) to MLflow from a background thread, so that a
    tracking-server outage neither blocks nor fails the training that logs them.

    :meth:`log` queues and returns at once. The thread sends the queue in order, in batches the
    server accepts (``batch_size`` metrics); a batch the server does not take stays queued and is
    sent again after a pause that doubles from ``first_delay_s`` up to ``max_delay_s``. Each
    metric keeps the timestamp it was logged with, so a batch the server stored just before a
    connection broke is not stored twice when it is sent again (MLflow drops identical metrics).
    The queue holds at most ``max_pending`` metrics; beyond that the oldest are dropped and
    counted. :meth:`close` waits up to ``timeout_s`` for the queue to drain, then counts what is
    left as lost: a warning, and the run's ``cfcml.metrics_lost`` tag (sent with the same
    patience). Returns the number lost.
    """

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        *,
        batch_size: int = 900,
        max_pending: int = 1_000_000,
        first_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
    ):
        self.client, self.run_id = client, run_id
        self.batch_size, self.max_pending = batch_size, max_pending
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.delivered = self.dropped = self.failures = 0
        self._metrics: deque[Metric] = deque()
        self._tags: dict[str, str] = {}
        self._cond = threading.Condition()
        self._closing = self._stopped = False
        self._thread = threading.Thread(target=self._run, name=f"mlflow-sender-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Metric values queued and not yet delivered."""
        with self._cond:
            return len(self._metrics)

    def log(self, metrics: dict, step: int, timestamp_ms: int | None = None, tags: dict | None = None) -> None:
        """Queue ``metrics`` (numbers only; other values are skipped) at ``step``, and ``tags``."""
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
        with self._cond:
            if self._closing:
                raise RuntimeError(f"the metric sender of MLflow run {self.run_id} is closed")
            self._metrics.extend(batch)
            self._tags.update({k: str(v) for k, v in (tags or {}).items()})
            while len(self._metrics) > self.max_pending:
                self._metrics.popleft()
                self.dropped += 1
            self._cond.notify_all()

    def _run(self) -> None:
        delay = self.first_delay_s
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._metrics or self._tags or self._closing)
                if self._stopped or not (self._metrics or self._tags):
                    return  # closed, and drained or given up
                metrics = [self._metrics[i] for i in range(min(self.batch_size, len(self._metrics)))]
                tags = [RunTag(k, v) for k, v in list(self._tags.items())[:100]]
            try:
                self.client.log_batch(self.run_id, metrics=metrics, tags=tags)
            except Exception as e:  # noqa: BLE001 - keep it queued and try again
                self.failures += 1
                if self.failures == 1 or delay >= self.max_delay_s:
                    logger.warning(
                        "MLflow run %s: %d metric value(s) wait for the tracking server (%s)",
                        self.run_id,
                        self.pending,
                        one_line(e, limit=200),
                    )
                with self._cond:
                    if self._cond.wait_for(lambda: self._stopped, timeout=delay):
                        return
                delay = min(2 * delay, self.max_delay_s)
                continue
            with self._cond:
                if self._stopped:
                    return  # close() has counted and cleared the queue meanwhile
                for _ in metrics:
                    self._metrics.popleft()
                for tag in tags:
                    if self._tags.get(tag.key) == tag.value:
                        del self._tags[tag.key]
                self.delivered += len(metrics)
                self._cond.notify_all()
            if delay > self.first_delay_s:
                logger.info("MLflow run %s: the tracking server answers again; waiting values delivered", self.run_id)
            delay = self.first_delay_s

    def close(self, timeout_s: float = 120.0) -> int:
        """Wait up to ``timeout_s`` for every queued value to reach the server; returns how many
        metric values never did (also tagged on the run as ``cfcml.metrics_lost``, best effort)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            self._stopped = True
            lost = len(self._metrics) + self.dropped
            self._metrics.clear()
            self._cond.notify_all()
        if lost:
            logger.warning(
                "MLflow run %s: %d metric value(s) could not be delivered (tracking server unreachable); tagged %s",
                self.run_id,
                lost,
                TAG_METRICS_LOST,
            )
            try:
                call_with_retry(
                    lambda: self.client.set_tag(self.run_id, TAG_METRICS_LOST, str(lost)),
                    f"tag run {self.run_id} with {TAG_METRICS_LOST}",
                    deadline_s=min(timeout_s, 30.0),
                )
            except Exception as e:  # noqa: BLE001 - the warning above still says it
                logger.warning(
                    "could not tag MLflow run %s with %s=%d: %s",
                    self.run_id,
                    TAG_METRICS_LOST,
                    lost,
                    one_line(e, limit=200),
                )
        return lost
