"""The node-loss watch's decision (cfcml/platform/study/node_watch.py): stop only when a node seen
alive is gone, a placement group has waited to be placed since, and no trial has reported for the
timeout; the real cluster case is tests/platform/test_two_node.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from cfcml.platform.study.node_watch import NodeLossWatch, waiting_placement_groups

A, B, C = "node-a", "node-b", "node-c"


def watch_through(watch: NodeLossWatch, steps) -> list:
    return [watch.observe(now, alive, infeasible) for now, alive, infeasible in steps]


def test_stops_once_a_lost_nodes_trial_has_waited_the_timeout():
    watch = NodeLossWatch(timeout_s=30)
    verdicts = watch_through(
        watch,
        [
            (0, {A, B}, set()),
            (10, {A}, set()),  # B lost at 10
            (15, {A}, {"pg1"}),  # the restarted worker group cannot be placed from 15
            (44, {A}, {"pg1"}),
            (45, {A}, {"pg1"}),
        ],
    )
    assert verdicts[:4] == [None] * 4
    assert verdicts[4] is not None and B in verdicts[4] and "--node-loss-timeout 30" in verdicts[4]


def test_a_wait_through_ray_trains_retries_still_counts():
    """Ray Train replaces a group that timed out with a new one (a new id, maybe a poll between
    them where none waits): the wait goes on."""
    watch = NodeLossWatch(timeout_s=60, gap_s=30)
    steps = [(0, {A, B}, set()), (10, {A}, {"pg1"}), (40, {A}, set()), (45, {A}, {"pg2"}), (69, {A}, {"pg2"})]
    assert watch_through(watch, steps) == [None] * 5
    assert watch.observe(71, {A}, {"pg2"}) is not None


def test_a_trial_that_continues_on_the_remaining_nodes_is_left_alone():
    watch = NodeLossWatch(timeout_s=30)
    watch_through(watch, [(0, {A, B}, set()), (10, {A}, set())])
    # the worker group was re-placed: nothing infeasible, trials report
    for now in range(20, 200, 10):
        watch.reported(now)
        assert watch.observe(now, {A}, set()) is None


def test_a_trial_still_reporting_is_not_stopped_by_someone_elses_waiting_group():
    watch = NodeLossWatch(timeout_s=30)
    watch_through(watch, [(0, {A, B}, set()), (10, {A}, {"other-job"})])
    for now in range(20, 200, 10):
        watch.reported(now - 5)
        assert watch.observe(now, {A}, {"other-job"}) is None
    assert watch.observe(200 + 31, {A}, {"other-job"}) is not None  # once reports stop, it counts


def test_no_loss_no_stop_and_a_replacement_or_return_clears_it():
    busy = NodeLossWatch(timeout_s=30)  # a cluster too small for a trial, but no node lost
    assert watch_through(busy, [(0, {A}, {"pg1"}), (100, {A}, {"pg1"})]) == [None, None]

    back = NodeLossWatch(timeout_s=30)
    watch_through(back, [(0, {A, B}, set()), (10, {A}, {"pg1"})])
    assert back.observe(20, {A, B}, set()) is None and not back.lost  # the node came back
    assert back.observe(100, {A, B}, {"pg1"}) is None  # waiting without a loss: a scheduling matter

    replaced = NodeLossWatch(timeout_s=30)
    watch_through(replaced, [(0, {A, B}, set()), (10, {A}, {"pg1"})])
    assert replaced.observe(20, {A, C}, set()) is None  # an autoscaler's node: the group is placed


def test_timeout_zero_waits_forever():
    watch = NodeLossWatch(timeout_s=0)
    assert watch_through(watch, [(0, {A, B}, set()), (10, {A}, {"pg1"}), (10**6, {A}, {"pg1"})]) == [None] * 3


def test_waiting_groups_are_read_from_rays_placement_group_table():
    table = {  # the shape ray.util.placement_group_table() returns (Ray 2.x)
        "pg-no-node": {"state": "PENDING", "stats": {"scheduling_state": "INFEASIBLE"}},
        "pg-too-few-cpus": {"state": "PENDING", "stats": {"scheduling_state": "NO_RESOURCES"}},
        "pg-rescheduling": {"state": "RESCHEDULING", "stats": {"scheduling_state": "QUEUED"}},
        "pg-created": {"state": "CREATED", "stats": {"scheduling_state": "FINISHED"}},
        "pg-removed": {"state": "REMOVED", "stats": {"scheduling_state": "REMOVED"}},
    }
    assert waiting_placement_groups(table) == {"pg-no-node", "pg-too-few-cpus", "pg-rescheduling"}


PLACE = """
import json, tempfile, ray
from ray.util.placement_group import placement_group
from cfcml.platform.study.node_watch import waiting_placement_groups
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(dir="/tmp"), configure_logging=False)
too_big, fits = placement_group([{"CPU": 1}, {"CPU": 1}]), placement_group([{"CPU": 1}], strategy="SPREAD")
assert fits.wait(60)
print(json.dumps({"waiting": sorted(waiting_placement_groups(ray.util.placement_group_table())),
                  "too_big": too_big.id.hex()}))
ray.shutdown()
"""


def test_a_placement_group_too_big_for_the_cluster_reads_as_waiting():
    """Against a real Ray (its own 1-CPU local instance, in a subprocess): of a group of two
    1-CPU bundles and one of one, only the first waits."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    out = subprocess.run(
        [sys.executable, "-c", PLACE], check=False, capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["waiting"] == [seen["too_big"]]
