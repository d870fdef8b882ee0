"""Soak: does a long study's driver stay bounded? (issue 23, part 4)

Runs one study of many tiny trials (``men-smoke`` at 4x16x16, 1 fold, 1-2 epochs; Ray Tune +
Optuna + ASHA + MLflow, exactly ``jobs/tune_men.py``'s ``run_study``) in this process, which is
the study's driver, and samples the driver every few seconds: resident memory (VmRSS), open file
descriptors and threads, against the number of trials Optuna has closed. It reports the driver at
trial 5 and at the end, the growth per trial between them (a least-squares slope over every
sample after trial 5, so one garbage-collection step does not decide it), and the Ray object
store's bytes in use (the raylet's store stats) at both points.

    python benchmarks/soak_study.py                 # 40 trials, ~10-20 min on 2 free cores
    python benchmarks/soak_study.py --trials 45 --json soak.json

Services: a local MLflow server and Ray head are started (``cfcml.platform.services``, as
``make run`` does) and stopped at the end, unless ``--tracking-uri`` and ``--ray-address`` name
running ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("soak")


def driver_sample() -> dict:
    """This process now: RSS (MiB), open file descriptors, threads."""
    status = Path("/proc/self/status").read_text()
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))
    return {"time": time.time(), "rss_mib": rss_kib / 1024, "fds": len(os.listdir("/proc/self/fd")), "threads": threads}


def object_store(address: str | None) -> dict:
    """Bytes the Ray object store holds (all nodes), from the raylet's store stats."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(address)).store_stats
    return {"object_store_mib": stats.object_store_bytes_used / 2**20, "spilled_mib": stats.spilled_bytes_total / 2**20}


def closed_trials(optuna_db: Path) -> int:
    """Trials Optuna has closed (COMPLETE, PRUNED or FAIL), read with a short-lived connection."""
    if not optuna_db.exists():
        return 0
    con = sqlite3.connect(f"file:{optuna_db}?mode=ro", uri=True, timeout=5)
    try:
        return int(
            con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')").fetchone()[0]
        )
    except sqlite3.Error:
        return 0  # the schema is not written yet
    finally:
        con.close()


class Sampler(threading.Thread):
    """Samples the driver every ``interval`` s; snapshots it (and the object store) when the
    ``at``-th trial has closed."""

    def __init__(self, optuna_db: Path, ray_address: str | None, at: int = 5, interval: float = 2.0):
        super().__init__(name="soak-sampler", daemon=True)
        self.optuna_db, self.ray_address, self.at, self.interval = optuna_db, ray_address, at, interval
        self.samples: list[dict] = []
        self.snapshot: dict | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            sample = {**driver_sample(), "trials": closed_trials(self.optuna_db)}
            self.samples.append(sample)
            if self.snapshot is None and sample["trials"] >= self.at:
                try:
                    sample = {**sample, **object_store(self.ray_address)}
                except Exception as e:  # noqa: BLE001 - Ray not initialised yet: next sample
                    log.warning("object store stats: %s", e)
                    continue
                self.snapshot = sample
                log.info("trial %d: %s", sample["trials"], sample)


def _disconnect_ray() -> None:
    """Leave the Ray cluster before its head is stopped (a connected driver is killed by its core
    worker when the head's GCS has been gone for 60 s)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def start_services(state: Path, cpus: int) -> list:
    """A local MLflow server and Ray head (as `make run` starts them); their client environment
    is exported so that run_study and MlflowClient find them."""
    from cfcml.platform.services import stack_client_env, start_tracking_and_ray

    mlflow, ray = start_tracking_and_ray(state, cpus, {"HF_HUB_OFFLINE": "1"})
    os.environ.update(stack_client_env(mlflow, ray))
    return [ray, mlflow]


def write_space(path: Path) -> Path:
    """smoke.yaml with ASHA's first rung at epoch 1 (the tiny trials train 1-2 epochs)."""
    text = (ROOT / "search_spaces" / "smoke.yaml").read_text()
    path.write_text(re.sub(r"grace_period:\s*\d+", "grace_period: 1", text))
    return path


def slope(samples: list[dict], key: str, after: int) -> float:
    """Least-squares growth of ``key`` per closed trial over the samples past trial ``after``."""
    points = [(s["trials"], s[key]) for s in samples if s["trials"] > after]
    if len({t for t, _ in points}) < 2:
        return float("nan")
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (ASHA may stop a trial after 1)")
    p.add_argument("--patients", type=int, default=30)
    p.add_argument("--at", type=int, default=5, help="the early snapshot: after this many trials")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray head started here")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: a new one under /tmp)")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--ray-address", default=None)
    p.add_argument("--json", type=Path, default=None, help="write the samples and the summary here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="soak-", dir="/tmp"))  # short: Ray's socket paths
    work.mkdir(parents=True, exist_ok=True)
    services, sampler = [], None
    try:
        if args.tracking_uri and args.ray_address:
            os.environ["MLFLOW_TRACKING_URI"], os.environ["RAY_ADDRESS"] = args.tracking_uri, args.ray_address
        else:
            services = start_services(work / "svc", args.cpus)
        from cfcml.datasets import write_synthetic
        from cfcml.platform.study import StudySpec, run_study

        data = work / f"men{args.patients}"
        if not (data / "clinical.csv").exists():
            write_synthetic("men", data, args.patients, 0)
        name = f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
        optuna_db = work / f"{name}.optuna.db"
        overrides = [
            "data.image_size=[4,16,16]",
            "data.aug_prob=0.0",
            f"data.cache_dir={work / 'cache'}",
            "train.device=cpu",
            "train.threads=1",
            "train.select_min_epoch=0",
            "train.select_window=1",
        ]
        spec = StudySpec.of(
            preset="men-smoke",
            data=str(data),
            dataset="men",
            name=name,
            overrides=overrides,
            search_space=str(write_space(work / "space.yaml")),
            num_samples=args.trials,
            epochs=args.epochs,
            location=str(work / "ray_results"),
            search_runs=1,
            tracking_uri=os.environ["MLFLOW_TRACKING_URI"],
            experiment="cfcml-soak",
            register=False,
            optuna_storage=f"sqlite:///{optuna_db}",
            ray_address=os.environ.get("RAY_ADDRESS"),
            work_dir=str(work / "eval"),
            git_commit="soak",
        )
        start = driver_sample()
        sampler = Sampler(optuna_db, os.environ.get("RAY_ADDRESS"), at=args.at)
        sampler.start()
        t0 = time.time()
        run_study(spec)
        seconds = time.time() - t0
        sampler.stop_event.set()
        sampler.join()
        end = {**driver_sample(), "trials": closed_trials(optuna_db), **object_store(os.environ.get("RAY_ADDRESS"))}
        early = sampler.snapshot
        if early is None:
            raise SystemExit(f"the study closed fewer than {args.at} trials: nothing to compare")
        samples = sampler.samples
        summary = {
            "trials": end["trials"],
            "seconds": round(seconds, 1),
            "at": args.at,
            "start": start,
            "early": early,
            "end": end,
            "peak_rss_mib": max(s["rss_mib"] for s in samples),
            "rss_mib_per_trial": slope(samples, "rss_mib", args.at),
            "fds_per_trial": slope(samples, "fds", args.at),
            "threads_per_trial": slope(samples, "threads", args.at),
        }
        print(f"soak: {end['trials']} trials in {seconds:.0f} s (driver pid {os.getpid()})")
        print(f"{'':>14} {'RSS MiB':>9} {'fds':>5} {'threads':>8} {'object store MiB':>17}")
        print(f"{'start':>14} {start['rss_mib']:9.1f} {start['fds']:5d} {start['threads']:8d} {'':>17}")
        for label, s in ((f"trial {early['trials']}", early), (f"end ({end['trials']})", end)):
            print(f"{label:>14} {s['rss_mib']:9.1f} {s['fds']:5d} {s['threads']:8d} {s['object_store_mib']:17.2f}")
        print(
            f"growth per trial after trial {args.at}: RSS {summary['rss_mib_per_trial']:+.2f} MiB, "
            f"fds {summary['fds_per_trial']:+.3f}, threads {summary['threads_per_trial']:+.3f}; "
            f"peak RSS {summary['peak_rss_mib']:.1f} MiB"
        )
        if args.json:
            args.json.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1) + "\n")
    except BaseException:
        # logged now: once the Ray head below is stopped, this driver's Ray core worker ends the
        # process within a minute, before Python could print the traceback
        log.exception("soak failed")
        if args.json and sampler is not None:  # what was measured before the failure is kept
            failed = {"error": "see the log", "early": sampler.snapshot, "samples": list(sampler.samples)}
            args.json.write_text(json.dumps(failed, indent=1) + "\n")
        raise
    finally:
        _disconnect_ray()
        for service in services:
            service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
