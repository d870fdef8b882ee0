"""Stop a study cleanly when a lost node leaves trials that the remaining nodes cannot place.

When a node dies, Ray Train restarts the trial's worker group from its last checkpoint
(``--max-failures``); if the remaining nodes fit it, the trial simply continues. If they do not,
Ray Train waits for resources indefinitely, which is right on an autoscaling cluster (a new node
comes) and wrong on a fixed one (nothing comes, the study hangs). :class:`NodeLossWatch` tells
the two apart: a node seen alive is now dead, a placement group has been waiting to be placed
since then and no trial has reported for ``timeout_s``. Then it
stops the study the way Ctrl+C does (Tune's SIGINT handler checkpoints the experiment state),
so every MLflow run is closed and ``--resume`` finishes the study once the node is back.

The decision (:meth:`NodeLossWatch.observe`) is a pure function of what was polled; the Tune
callback built by :func:`node_watch_callback` polls Ray's public state calls every few seconds.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

WAITING_STATES = {"PENDING", "RESCHEDULING"}


@dataclass
class NodeLossWatch:
    """Remembers the nodes seen alive, when each was lost, since when some placement group has
    waited and when a trial last reported; :meth:`observe` says why to stop, or None.

    The wait is the cluster's, not one group's: Ray Train gives up on a group after its start
    timeout and asks again with a new one, so ids change while the wait goes on; a wait ends
    only after no group has waited for ``gap_s`` (longer than a retry's gap, shorter than a
    trial re-placed on the remaining nodes takes to report)."""

    timeout_s: float
    gap_s: float = 30.0
    seen: set[str] = field(default_factory=set)
    lost: dict[str, float] = field(default_factory=dict)  # node id -> when it was first seen dead
    waiting_since: float | None = None  # since when some placement group has waited
    last_waiting: float = 0.0
    last_report: float = 0.0

    def reported(self, now: float) -> None:
        self.last_report = now

    def observe(self, now: float, alive: set[str], waiting: set[str]) -> str | None:
        if not self.last_report:
            self.last_report = now
        for node in self.seen - alive:
            self.lost.setdefault(node, now)
        for node in alive:
            self.lost.pop(node, None)  # the same node back (a restarted raylet has a new id)
        self.seen |= alive
        if waiting:
            self.waiting_since = now if self.waiting_since is None else self.waiting_since
            self.last_waiting = now
        elif self.waiting_since is not None and now - self.last_waiting > self.gap_s:
            self.waiting_since = None
        if self.timeout_s <= 0 or not self.lost or self.waiting_since is None:
            return None
        first_lost = min(self.lost.values())
        # waiting for the lost capacity: since the loss, since groups wait and since the last report
        since = max(first_lost, self.waiting_since, self.last_report)
        if now - since < self.timeout_s:
            return None
        nodes = ", ".join(sorted(n[:12] for n in self.lost))
        return (
            f"lost Ray node(s) {nodes} {now - first_lost:.0f} s ago and the remaining nodes cannot place "
            f"the trials' workers (no trial reported for {now - self.last_report:.0f} s, "
            f"--node-loss-timeout {self.timeout_s:g})"
        )


def waiting_placement_groups(table: dict) -> set[str]:
    """Ids of the placement groups not placed yet, from `ray.util.placement_group_table()`.
    Ray's own verdict is no help here: a group that needs more CPUs than the cluster has left
    reads NO_RESOURCES, as a group behind busy CPUs does; INFEASIBLE only when no node has the
    resource at all. With a lost node and no trial reporting, waiting is what matters."""
    return {pg_id for pg_id, pg in table.items() if pg.get("state") in WAITING_STATES}


# The driver's watch settings and verdict. Module state, not the callback's: a resumed study's
# callback is unpickled from the experiment state, yet must use this run's timeout and report here.
_ARMED = {"timeout_s": 0.0, "reason": None}


def arm(timeout_s: float) -> None:
    """Set this study run's timeout (0: off) and clear an earlier verdict."""
    _ARMED.update(timeout_s=float(timeout_s), reason=None)


def stop_reason() -> str | None:
    """Why the watch stopped the study in this process, or None."""
    return _ARMED["reason"]


def node_watch_callback(poll_s: float = 5.0):
    """The Tune callback (driver side) that stops the study when :class:`NodeLossWatch` says so,
    with the timeout given to :func:`arm`."""
    import ray
    from ray import tune

    class NodeLossCallback(tune.Callback):
        def __init__(self):
            self.watch, self._polled = None, 0.0

        def __getstate__(self):  # Tune pickles callbacks with the experiment state
            return {"watch": None, "_polled": 0.0}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if self.watch is not None:
                self.watch.reported(time.time())

        def on_step_begin(self, iteration, trials, **info):
            now = time.time()
            if _ARMED["timeout_s"] <= 0 or _ARMED["reason"] or now - self._polled < poll_s:
                return
            self._polled = now
            if self.watch is None:
                self.watch = NodeLossWatch(_ARMED["timeout_s"])
            try:
                alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
                waiting = waiting_placement_groups(ray.util.placement_group_table())
            except Exception as e:  # noqa: BLE001 - a failed poll must not stop the study; the next one may work
                log.debug("node watch: could not read the cluster state: %s", e)
                return
            known_lost = set(self.watch.lost)
            reason = self.watch.observe(now, alive, waiting)
            if set(self.watch.lost) - known_lost:
                log.warning(
                    "Ray node(s) lost: %s; trials the remaining nodes cannot place stop the study after %g s",
                    ", ".join(sorted(self.watch.lost)),
                    _ARMED["timeout_s"],
                )
            if reason:
                _ARMED["reason"] = reason
                log.error("stopping the study: %s", reason)
                signal.raise_signal(signal.SIGINT)  # Tune's clean stop, as Ctrl+C: state kept for --resume

    return NodeLossCallback()
