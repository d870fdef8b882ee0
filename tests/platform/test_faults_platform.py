"""Bad inputs and faults on the platform side: each is refused with one clear line and the
documented exit status (2 bad input, 1 internal, 3 promotion refused), no traceback, no
stray files, nothing run from data. (Services, redaction and checkpoints have their own
files; this is the CLI's view of them.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def cfcml(*args: str, cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the `cfcml` command in a fresh interpreter with no tracking server configured."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base.update({"PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "cfcml.cli", *args],
        cwd=cwd,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def closed_port() -> int:
    from cfcml.platform.services import free_port

    return free_port()  # nothing listens there once the probe socket is closed


# --------------------------------------------------------------------------- no services needed

NO_SERVER_CASES = {
    "predict, no tracking URI": (
        ["predict", "--model", "models:/cfcml-men@champion", "--data", "."],
        ["no MLflow tracking server given", "--tracking-uri"],
    ),
    "predict, closed port": (
        [
            "predict",
            "--model",
            "models:/cfcml-men@champion",
            "--data",
            ".",
            "--tracking-uri",
            "http://127.0.0.1:{port}",
        ],
        ["cannot reach the MLflow tracking server", "connection refused"],
    ),
    "predict, unknown host": (
        ["predict", "--model", "runs:/abc/model", "--data", ".", "--tracking-uri", "http://no-such-host.invalid:5000"],
        ["cannot reach", "unknown host name"],
    ),
    "predict, no database file": (
        ["predict", "--model", "models:/m@champion", "--data", ".", "--tracking-uri", "sqlite:///mlflow.db"],
        ["no MLflow database at mlflow.db", "does not create one"],
    ),
    "predict, no model folder": (
        ["predict", "--model", "./no-model", "--data", "."],
        ["no MLflow model at ./no-model"],
    ),
    "promote, no tracking URI": (
        ["promote", "--model", "cfcml-men", "--alias", "challenger"],
        ["no MLflow tracking server given"],
    ),
    "promote, closed port": (
        ["promote", "--model", "cfcml-men", "--alias", "challenger", "--tracking-uri", "http://127.0.0.1:{port}"],
        ["cannot reach the MLflow tracking server"],
    ),
    "promote, password in URI is redacted": (
        ["promote", "--model", "m", "--alias", "a", "--tracking-uri", "http://admin:hunter2@127.0.0.1:{port}"],
        ["admin:***@127.0.0.1"],
    ),
}


@pytest.mark.parametrize("case", list(NO_SERVER_CASES))
def test_bad_tracking_input_is_one_line_exit_2_and_leaves_no_database(case, tmp_path):
    args, needles = NO_SERVER_CASES[case]
    port = closed_port()
    t0 = time.monotonic()
    r = cfcml(*[a.format(port=port) for a in args], cwd=tmp_path)
    assert_one_line(r, 2, *needles)
    assert "hunter2" not in r.stderr
    assert time.monotonic() - t0 < 60  # seconds, not MLflow's minutes of retries
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no ./mlflow.db, no mlruns/


def test_contradicting_direction_flags_are_a_usage_error(tmp_path):
    r = cfcml("promote", "--model", "m", "--version", "1", "--greater-is-better", "--lower-is-better", cwd=tmp_path)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_internal_error_is_one_line_exit_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    from cfcml import cli

    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(cli.commands, "cmd_summary", broken)  # the parser reads it from there
    assert cli.main(["summary", "--preset", "men-smoke"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        (
            "error: internal error: TypeError: unsupported operand type(s) for +: 'int' and 'NoneType' "
            "(cfcml --debug ... shows the traceback)"
        )
    ]
    assert cli.main(["summary", "--preset", "men-smoke", "--debug"]) == 1  # --debug anywhere
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().endswith("'NoneType'")


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (
            FileNotFoundError(2, "No such file or directory", "/data/men/clinical.csv"),
            2,
            "error: /data/men/clinical.csv: No such file or directory",
        ),
        (PermissionError(13, "Permission denied", "/data/locked"), 2, "error: /data/locked: Permission denied"),
        (
            ValueError("cannot open postgresql://u:hunter2@db/x\nsecond line"),
            1,
            "error: internal error: ValueError: cannot open postgresql://u:***@db/x | second line",
        ),
        (KeyboardInterrupt(), 130, "error: interrupted"),
    ],
)
def test_error_lines_and_exit_codes(monkeypatch, capsys, exc, code, line):
    from cfcml import cli

    def failing(args):
        raise exc

    monkeypatch.setattr(cli.commands, "cmd_summary", failing)  # the parser reads it from there
    assert cli.main(["summary", "--preset", "men-smoke"]) == code
    assert (
        capsys.readouterr().err.strip().splitlines()[0].removesuffix(" (cfcml --debug ... shows the traceback)") == line
    )


def test_errors_may_declare_their_exit_code(monkeypatch, capsys):
    from cfcml import cli

    class RunMismatch(Exception):
        exit_code = 2

    def failing(args):
        raise RunMismatch("runs/cv/fold1 was trained with another config; use --out or --overwrite")

    monkeypatch.setattr(cli.commands, "cmd_summary", failing)  # the parser reads it from there
    assert cli.main(["summary", "--preset", "men-smoke"]) == 2
    assert capsys.readouterr().err.startswith("error: runs/cv/fold1 was trained with another config")


# --------------------------------------------------------------------------- against a real MLflow server


@pytest.fixture(scope="module")
def registry_versions(mlflow_server):
    """A registered model with versions whose evaluation.json holds auc / brier / dice, measured
    on the same patients under the same protocol, but for `other_data`."""
    from mlflow import MlflowClient

    from tests.platform.test_registry import version

    client = MlflowClient(mlflow_server.url)
    env = (client, client.create_experiment(f"faults-{uuid.uuid4().hex[:6]}"), None)
    name = f"faults-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    versions = {}
    for key, metrics, digest in [
        ("champion", {"auc": 0.8, "brier": 0.2}, "d1"),
        ("worse_brier", {"auc": 0.9, "brier": 0.9}, "d1"),
        ("infinite", {"auc": float("inf"), "brier": 0.1}, "d1"),
        ("other_data", {"auc": 0.95, "brier": 0.1}, "d2"),
        ("custom", {"auc": 0.9, "dice": 0.7}, "d1"),
    ]:
        versions[key] = version(env, name, metrics, data_digest=digest)
    client.set_registered_model_alias(name, "champion", versions["champion"])
    return mlflow_server.url, name, versions


SERVER_CASES = {
    "brier 0.9 does not beat 0.2": (
        ["--version", "{worse_brier}", "--metric", "brier"],
        3,
        ["refused", "brier=0.9 is not better", "lower is better"],
    ),
    "inf is not a value": (["--version", "{infinite}"], 2, ["auc = inf is not a finite number"]),
    "other evaluation data": (
        ["--version", "{other_data}", "--metric", "brier"],
        2,
        ["not measured alike", "data_digest d2 vs d1", "--force --reason"],
    ),
    "the search's maximum": (
        ["--version", "{custom}", "--metric", "val_auc"],
        2,
        ["search's maximum", "can never be the gate metric"],
    ),
    "unknown metric without a direction": (
        ["--version", "{custom}", "--metric", "dice"],
        2,
        ["unknown metric 'dice'", "--greater-is-better"],
    ),
    "direction contradicts the metric": (
        ["--version", "{custom}", "--metric", "brier", "--greater-is-better"],
        2,
        ["lower is better; --greater-is-better contradicts it"],
    ),
    "force without reason": (["--version", "{other_data}", "--force"], 2, ["--force needs a non-empty --reason"]),
    "unknown model": (["--version", "1", "--model-suffix", "-nope"], 2, ["unknown registered model"]),
    "unknown alias": (["--alias", "challenger"], 2, ["has no alias 'challenger'"]),
}


@pytest.mark.services
@pytest.mark.parametrize("case", list(SERVER_CASES))
def test_promotion_refusals(registry_versions, case, tmp_path):
    url, name, versions = registry_versions
    args, code, needles = SERVER_CASES[case]
    args = [a.format(**versions) for a in args]
    if "--model-suffix" in args:
        i = args.index("--model-suffix")
        name, args = name + args[i + 1], args[:i] + args[i + 2 :]
    r = cfcml("promote", "--model", name, *args, "--tracking-uri", url, cwd=tmp_path)
    if code == 3:
        assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
        for needle in needles:
            assert needle in r.stdout, r.stdout
    else:
        assert_one_line(r, code, *needles)
    from mlflow import MlflowClient

    assert MlflowClient(url).get_registered_model(registry_versions[1]).aliases["champion"] == versions["champion"]


@pytest.mark.services
@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("models:/no-such-model@champion", ["cannot load models:/no-such-model@champion", "not found"]),
        ("runs:/0123456789abcdef0123456789abcdef/model", ["cannot load runs:/0123456789abcdef"]),
    ],
)
def test_predict_unknown_model_is_one_line(mlflow_server, model, needles, tmp_path):
    t0 = time.monotonic()
    r = cfcml("predict", "--model", model, "--data", str(tmp_path), "--tracking-uri", mlflow_server.url, cwd=tmp_path)
    assert_one_line(r, 2, *needles)
    assert time.monotonic() - t0 < 60


@pytest.mark.services
def test_predict_model_that_is_not_cfcml(mlflow_server, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from tests.platform.test_registry import FixedProbs

    url, name = mlflow_server.url, f"plain-{uuid.uuid4().hex[:6]}"
    mlflow.set_tracking_uri(url)
    with mlflow.start_run(experiment_id=MlflowClient(url).create_experiment(name)):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=FixedProbs([[1.0, 0.0]] * 3), pip_requirements=["numpy"]
        )
    mlflow.register_model(info.model_uri, name)
    r = cfcml("predict", "--model", f"models:/{name}/1", "--data", str(tmp_path), "--tracking-uri", url, cwd=tmp_path)
    assert_one_line(r, 2, "is not a cfcml model")
    assert not (tmp_path / "preds.csv").exists()


# --------------------------------------------------------------------------- checkpoints through the CLI


@pytest.fixture(scope="module")
def derm_cohort(tmp_path_factory):
    from cfcml.datasets import write_synthetic

    return write_synthetic("derm7pt", tmp_path_factory.mktemp("derm") / "release_v0", 40, seed=1)


class _Gadget:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("kind", ["malicious", "corrupt"])
def test_resume_from_a_bad_checkpoint_runs_nothing_and_exits_2(derm_cohort, tmp_path, kind):
    import torch

    run_dir, marker = tmp_path / "run", tmp_path / "PWNED"
    run_dir.mkdir()
    if kind == "malicious":
        torch.save({"model": _Gadget(marker), "epoch": 0}, run_dir / "last.pt")
    else:
        (run_dir / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    r = cfcml(
        "train",
        "--preset",
        "derm7pt-smoke",
        "--data",
        str(derm_cohort),
        "--seed",
        "0",
        "--out",
        str(run_dir),
        "--resume",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert not marker.exists(), "code from the checkpoint ran"
    assert_one_line(r, 2, str(run_dir / "last.pt"))
