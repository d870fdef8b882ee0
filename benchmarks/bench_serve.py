"""Serving latency of `cfcml serve`: p50/p95 per request at 1 and 16 cases a request, and cases/s.

    python benchmarks/bench_serve.py [--presets men-smoke,men] [--requests 20] [--batched-requests 5]

For each preset: a synthetic cohort, a model with random weights (latency does not depend on
training) packaged exactly as registration packages it and saved as an MLflow model folder,
then `cfcml serve --model FOLDER --data-root COHORT` in its own process on a free loopback
port, timed over real HTTP from this process (images as paths under the data root; every
request decodes, checks and preprocesses its volumes or photos from disk, no cache). On a
machine with CUDA each preset runs twice, on the CPU (CUDA hidden) and on the GPU. One line
per preset and device:

    men-smoke on cpu: 1 case/request p50 85.1 ms, p95 97.3 ms (20 requests); 16 cases/request p50 ... ms,
    p95 ... ms (5 requests); 18.3 cases/s
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "600")  # paper-size 16-case requests on a busy CPU


def saved_model(preset: str, work: Path) -> tuple[Path, Path]:
    """(MLflow model folder, cohort root) for a random-weight model of `preset`."""
    import mlflow
    import torch

    import cfcml
    from cfcml.config import build_config
    from cfcml.datasets import write_synthetic
    from cfcml.datasets.reader import load_cohort
    from cfcml.datasets.spec import load_spec
    from cfcml.engine.checkpoint import atomic_save
    from cfcml.engine.run_model import run_architecture
    from cfcml.platform.pyfunc import PACKAGE_ARTIFACT, build_package, model_signature

    cfg = build_config(
        preset, ["model.text_pretrained=none", "model.image_pretrained=none", f"data.cache_dir={work / 'cache'}"]
    )
    spec = load_spec(cfg.dataset)
    size = 40 if spec.kind.spatial_dims == 2 else 18  # cases: photos are cheap, volumes not
    root = write_synthetic(
        spec.name, work / "cohort" / ("release_v0" if spec.name == "derm7pt" else spec.name), size, seed=0
    )
    cohort = load_cohort(spec, root)
    torch.manual_seed(0)
    model = run_architecture(cfg, spec)
    atomic_save({"model": model.state_dict()}, work / "best.pt")
    package = build_package(cfg, [{"name": "run1", "weights": work / "best.pt"}], cohort, work / "package")
    folder = work / "model"
    mlflow.pyfunc.save_model(
        str(folder),
        python_model=str(Path(cfcml.__file__).parent / "platform" / "mlflow_model.py"),
        artifacts={PACKAGE_ARTIFACT: str(package)},
        code_paths=[str(Path(cfcml.__file__).resolve().parent)],
        signature=model_signature(spec),
        metadata={"dataset": spec.name},
    )
    return folder, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, root: Path, device: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [
        sys.executable,
        "-m",
        "cfcml.cli",
        "serve",
        "--model",
        str(folder),
        "--data-root",
        str(root),
        "--port",
        str(port),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cfcml serve exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise RuntimeError("cfcml serve did not start within 300 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def request_records(root: Path) -> list[dict]:
    from cfcml.datasets.reader import load_cohort
    from cfcml.platform.pyfunc import case_record

    cohort = load_cohort(load_cohort_spec(root), root)
    records = []
    for case in cohort.cases:
        rec = case_record(cohort.spec, case)
        for col in [*cohort.spec.series, "mask"]:
            if rec.get(col):
                rec[col] = str(Path(rec[col]).resolve().relative_to(root.resolve()))
        records.append(rec)
    return records


def load_cohort_spec(root: Path):
    from cfcml.datasets.spec import load_spec

    return load_spec("derm7pt" if root.name == "release_v0" else "men")


def time_requests(url: str, records: list[dict], per_request: int, n: int) -> list[float]:
    times = []
    for i in range(n + 1):  # the first request warms up and is not counted
        batch = [records[(i * per_request + k) % len(records)] for k in range(per_request)]
        body = json.dumps({"dataframe_records": batch}).encode()
        req = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
            assert r.status == 200
        if i:
            times.append(time.perf_counter() - t0)
    return times


def p(times: list[float], q: float) -> float:
    return (
        1000 * float(statistics.quantiles(times, n=100, method="inclusive")[q - 1])
        if len(times) > 1
        else 1000 * times[0]
    )


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="men-smoke,men")
    ap.add_argument("--requests", type=int, default=20, help="timed 1-case requests per preset (paper-size: a quarter)")
    ap.add_argument("--batched-requests", type=int, default=5, help="timed 16-case requests per preset")
    ap.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, and cuda when present)")
    args = ap.parse_args()
    devices = args.devices.split(",") if args.devices else ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    print(f"torch threads {torch.get_num_threads()}, CPU cores {os.cpu_count()}", flush=True)
    for preset in args.presets.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
            folder, root = saved_model(preset, Path(tmp))
            records = request_records(root)
            small = not preset.endswith("-smoke")
            for device in devices:
                proc, url = start_server(folder, root, device, Path(tmp) / f"server-{device}.log")
                try:
                    n1 = max(2, args.requests // 4) if small and device == "cpu" else args.requests
                    one = time_requests(url, records, 1, n1)
                    many = time_requests(url, records, 16, args.batched_requests)
                finally:
                    stop(proc)
                rate = 16 * len(many) / sum(many)
                print(
                    f"{preset} on {device}: 1 case/request p50 {p(one, 50):.1f} ms, p95 {p(one, 95):.1f} ms "
                    f"({len(one)} requests); 16 cases/request p50 {p(many, 50):.1f} ms, p95 {p(many, 95):.1f} ms "
                    f"({len(many)} requests); {rate:.2f} cases/s",
                    flush=True,
                )


if __name__ == "__main__":
    main()
