"""Live progress of training runs: runs x epochs done of the total, the latest validation metric
per run, elapsed and remaining time.

On a terminal one status line is redrawn in place; elsewhere (log files, `ray job logs`) each
finished epoch prints one plain line. Events may come from worker processes: `queue_reporter`
puts them on a multiprocessing queue that `Progress.follow` drains on a thread.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts epochs of `runs` (each at most `epochs`); `epoch_done` after each validation."""

    def __init__(
        self,
        runs: list[str],
        epochs: int,
        metric: str,
        stream=None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        unnamed_runs: int = 0,
    ):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.metric, self.clock, self.start = metric, clock, clock()
        self.planned = {r: epochs for r in runs}  # epochs each run will train (patience shortens it)
        self.done = dict.fromkeys(runs, 0)
        self.latest: dict[str, float] = {}
        self.epochs, self.unnamed_runs = epochs, unnamed_runs  # runs whose names come later (trials)
        self.resumed_epochs = 0  # done before this process started: not in the time estimate
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return sum(self.planned.values()) + self.unnamed_runs * self.epochs

    def add_run(self, run: str) -> None:
        """A run named once it starts (a study's trial): one of `unnamed_runs`, if any are left."""
        with self._lock:
            if run not in self.planned:
                self.planned[run], self.done[run] = self.epochs, 0
                self.unnamed_runs = max(0, self.unnamed_runs - 1)

    def end_unstarted(self) -> None:
        """No more runs will start (a budget or an interrupt ended the search)."""
        with self._lock:
            self.unnamed_runs = 0

    @property
    def completed(self) -> int:
        return sum(self.done.values())

    def remaining_seconds(self) -> float | None:
        new = self.completed - self.resumed_epochs
        if new <= 0:
            return None
        return (self.clock() - self.start) / new * (self.total - self.completed)

    def epoch_done(self, run: str, epoch: int, value: float) -> None:
        """`epoch` is 0-based; `value` the validation metric of that epoch."""
        with self._lock:
            if self.done[run] == 0 and epoch > 0:  # a resumed run: earlier epochs were not timed here
                self.resumed_epochs += epoch
            self.done[run] = max(self.done[run], epoch + 1)
            self.latest[run] = value
            self._emit(f"{run} epoch {epoch + 1}/{self.planned[run]}: val {self.metric}={value:.4f}")

    def run_done(self, run: str, epochs_trained: int) -> None:
        """A run finished, stopped early or was reused: it counts `epochs_trained` of the total."""
        with self._lock:
            if self.done[run] == 0:  # reused or resumed past its end: nothing timed here
                self.resumed_epochs += epochs_trained
            self.planned[run] = self.done[run] = epochs_trained

    def status(self) -> str:
        left = self.remaining_seconds()
        runs = " ".join(
            f"{r} {self.metric} {self.latest[r]:.3f}" if not math.isnan(self.latest[r]) else f"{r} {self.metric} nan"
            for r in self.planned
            if r in self.latest
        )
        eta = f", ~{_clock(left)} left" if left is not None else ""
        runs_text = f"{len(self.planned) + self.unnamed_runs} runs"
        return f"{self.completed}/{self.total} epochs ({runs_text}) | {runs} | {_clock(self.clock() - self.start)} elapsed{eta}"

    def _emit(self, event: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + self.status())
        else:
            self.stream.write(f"{event} ({self.status()})\n")
        self.stream.flush()

    def wrap(self, report: Callable[[str], None]) -> Callable[[str], None]:
        """`report` for other messages: on a terminal they print above the status line."""

        def show(message: str) -> None:
            with self._lock:
                if self.live:
                    self.stream.write("\r\033[K")
                    self.stream.flush()
                report(message)
                if self.live and self.completed:
                    self.stream.write(self.status())
                    self.stream.flush()

        return show

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()

    def follow(self, queue) -> threading.Thread:
        """Drain `(run, epoch, value)` events from `queue` on a thread until a None arrives."""

        def drain():
            while (event := queue.get()) is not None:
                self.epoch_done(*event)

        thread = threading.Thread(target=drain, name="cfcml-progress", daemon=True)
        thread.start()
        return thread


def reporter_for(progress: Progress | None, run: str, metric: str):
    """A `train_one` reporter that feeds `progress` (None: no reporting)."""
    if progress is None:
        return None
    return lambda epoch, record, out: progress.epoch_done(run, epoch, float(record.get(f"val_{metric}", math.nan)))


def queue_reporter(queue, run: str, metric: str):
    """A `train_one` reporter for a worker process: events go to the parent's `Progress.follow`."""
    if queue is None:
        return None
    return lambda epoch, record, out: queue.put((run, epoch, float(record.get(f"val_{metric}", math.nan))))
