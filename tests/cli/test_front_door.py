"""One front door: `cfcml tune` (options generated from StudySpec), the jobs/ shims over it, `cfcml dev`."""

import argparse
import runpy
import shlex
import sys
import typing
from pathlib import Path

import pytest

from cfcml.cli import main as cfcml_main
from cfcml.platform import services
from cfcml.platform.study import StudySpec
from cfcml.platform.study import options as study_options
from cfcml.platform.study import run as study_run

ROOT = Path(__file__).resolve().parents[2]
SPEC_FIELDS = study_options.study_fields()  # (part, field, type) of every leaf field
FIELDS = [f for _, f, _ in SPEC_FIELDS]


@pytest.fixture
def captured(monkeypatch):
    """The StudySpec each study would run with (run_study replaced: nothing starts)."""
    specs = []

    def fake_run_study(spec):
        specs.append(spec)
        return {"best_trial_id": "t0", "best_cv_val_auc": 0.5, "best_params": {}}

    monkeypatch.setattr(study_run, "run_study", fake_run_study)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CFCML_GIT_COMMIT", raising=False)
    return specs


def _run_job(job: str, argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [f"jobs/{job}", *argv])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / "jobs" / job), run_name="__main__")
    return e.value.code


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions}


def test_every_study_spec_field_has_an_option_with_help():
    actions = _actions(study_options.build_parser())
    missing = [f.name for f in FIELDS if f.name not in actions]
    assert not missing, f"StudySpec fields without a command-line option: {missing}"
    no_help = [f.name for f in FIELDS if not study_options.option_for(f).help]
    assert not no_help, f"StudySpec fields without help (add to study_options.OPTIONS): {no_help}"
    stale = set(study_options.OPTIONS) - {f.name for f in FIELDS}
    assert not stale, f"study_options.OPTIONS names fields StudySpec does not have: {stale}"


def _non_default_argv(tmp_path) -> tuple[list[str], dict]:
    """An argv that sets every StudySpec field away from its default, and the values expected."""
    hints = {f.name: tp for _, f, tp in SPEC_FIELDS}
    actions = _actions(study_options.build_parser())
    special = {
        "preset": "derm7pt-smoke",
        "dataset": "men",
        "data": str(tmp_path / "cohort"),
        "gpus_per_worker": "0.5",
        "fault": f"3:{tmp_path / 'marker'}:7",
        "holdout": "0.25",
    }
    argv, expected = [], {}
    for f in FIELDS:
        flag = actions[f.name].option_strings[0]
        base = study_options.unwrap_optional(hints[f.name])
        if base is bool:
            argv.append(flag)
            expected[f.name] = not study_options.field_default(f)
        elif typing.get_origin(base) is list:
            argv += [flag, "train.lr=0.001", flag, "loss.alpha=0.5"]
            expected[f.name] = ["train.lr=0.001", "loss.alpha=0.5"]
        else:
            text = special.get(f.name) or {int: "7", float: "2.5"}.get(base, f"x-{f.name}")
            argv += [flag, text]
            expected[f.name] = (study_options.option_for(f).parse or base)(text)
    expected["data"] = str(tmp_path / "cohort")  # a Path on the command line, a str in the spec
    return argv, expected


def test_generated_options_reach_every_field_of_the_spec(tmp_path):
    argv, expected = _non_default_argv(tmp_path)
    spec = study_options.study_spec(study_options.build_parser().parse_args(argv))
    got = spec.flat()
    assert StudySpec.of(**got) == spec
    defaults = {f.name: study_options.field_default(f) for f in FIELDS}
    assert got == expected
    assert all(got[name] != defaults[name] for name in got), "an option did not move its field off the default"
    assert got["fault"] == {"epoch": 3, "marker": str(tmp_path / "marker"), "hold_s": 7}


def test_cfcml_tune_help_lists_the_spec_options(capsys):
    with pytest.raises(SystemExit) as e:
        cfcml_main(["tune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for action in study_options.build_parser()._actions:
        if action.help != argparse.SUPPRESS:
            assert action.option_strings[0] in out
    assert "--set KEY=VALUE" in out and "--no-register" in out and "--inject-fault" not in out


def test_cfcml_dev_help_lists_start_stop_status(capsys):
    with pytest.raises(SystemExit) as e:
        cfcml_main(["dev", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("start", "stop", "status", "--state-dir"))


# The argv of `make run` (scripts/run.sh) and of tests/platform/test_platform_study.py, and the StudySpec
# jobs/_common.py built from them before the jobs became shims over `cfcml tune`.
MAKE_RUN = shlex.split(
    "--preset men-smoke --data /s/data --name men-smoke-1 --num-samples 3 --epochs 15 --storage /s/ray_results "
    "--tracking-uri http://127.0.0.1:5000 --git-commit abc --set data.cache_dir=/s/cache"
)
STUDY_TEST = shlex.split(
    "--preset men-smoke --data rel/cohort --name study --num-samples 2 --epochs 2 --search-runs 2 --storage /t/st "
    "--tracking-uri http://127.0.0.1:9 --ray-address 127.0.0.1:6379 --search-space /t/space.yaml "
    "--optuna-storage sqlite:////t/o.db --git-commit test-commit --inject-fault 2:/t/marker:120 --set a.b=1 "
    "--set train.epochs=2 --system-metrics-interval 2 --resume"
)


def _spec(**changes) -> StudySpec:
    base = {"location": str(Path("~/ray_results/cfcml").expanduser()), "dataset": "men"}
    return StudySpec.of(**(base | changes))


@pytest.mark.parametrize(
    "job,argv,expected",
    [
        (
            "tune_men.py",
            MAKE_RUN,
            _spec(
                preset="men-smoke",
                data="/s/data",
                name="men-smoke-1",
                num_samples=3,
                epochs=15,
                location="/s/ray_results",
                tracking_uri="http://127.0.0.1:5000",
                git_commit="abc",
                overrides=["data.cache_dir=/s/cache"],
            ),
        ),
        (
            "tune_men.py",
            STUDY_TEST,
            _spec(
                preset="men-smoke",
                data="rel/cohort",
                name="study",
                num_samples=2,
                epochs=2,
                search_runs=2,
                location="/t/st",
                tracking_uri="http://127.0.0.1:9",
                ray_address="127.0.0.1:6379",
                search_space="/t/space.yaml",
                optuna_storage="sqlite:////t/o.db",
                git_commit="test-commit",
                fault={"epoch": 2, "marker": "/t/marker", "hold_s": 120},
                overrides=["a.b=1", "train.epochs=2"],
                system_metrics_interval=2.0,
                resume=True,
            ),
        ),
        (
            "tune_derm7pt.py",
            ["--data", "d", "--gpus-per-worker", "0.5", "--no-register", "--no-system-metrics"],
            _spec(
                preset="derm7pt", dataset="derm7pt", data="d", gpus_per_worker=0.5, register=False, system_metrics=False
            ),
        ),
        (
            "tune.py",
            [
                "--dataset",
                "examples/../examples/glioma-demo.yaml",
                "--preset",
                "men-smoke",
                "--data",
                "d",
                "--inject-fault",
                "1:/m",
            ],
            _spec(
                preset="men-smoke",
                dataset=str(ROOT / "examples" / "glioma-demo.yaml"),
                data="d",
                fault={"epoch": 1, "marker": "/m"},
            ),
        ),
    ],
)
def test_jobs_build_the_same_study_spec_as_before(job, argv, expected, captured, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert _run_job(job, argv, monkeypatch) == 0
    assert captured == [expected]
    assert "best trial t0" in capsys.readouterr().out
    # `cfcml tune` is the same entry point: jobs/tune.py's argv gives the same spec
    if job == "tune.py":
        assert cfcml_main(["tune", *argv]) == 0
        assert captured == [expected, expected]


def test_jobs_take_their_defaults_from_the_environment(captured, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("CFCML_GIT_COMMIT", "feedbeef")
    out = tmp_path / "summary.json"
    assert _run_job("tune_derm7pt.py", ["--data", str(tmp_path), "--json-out", str(out)], monkeypatch) == 0
    (spec,) = captured
    assert (spec.tracking.tracking_uri, spec.tracking.git_commit, spec.dataset, spec.preset) == (
        "http://127.0.0.1:5999",
        "feedbeef",
        "derm7pt",
        "derm7pt",
    )
    assert '"best_trial_id": "t0"' in out.read_text()


def test_bad_study_input_exits_2_with_the_problem_named(captured, monkeypatch, capsys):
    assert cfcml_main(["tune", "--preset", "men-smoke", "--dataset", "no-such-cohort", "--data", "d"]) == 2
    assert "no-such-cohort" in capsys.readouterr().err and captured == []
    with pytest.raises(SystemExit) as e:
        cfcml_main(["tune", "--preset", "men-smoke", "--gpus-per-worker", "-1"])
    assert e.value.code == 2 and "expected auto or a number >= 0, got '-1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study_options.build_parser().parse_args(["--preset", "x", "--inject-fault", "soon"])
    assert "expected EPOCH:MARKER[:HOLD_S], got 'soon'" in capsys.readouterr().err


def test_dev_status_and_stop_with_nothing_running(tmp_path, capsys):
    assert cfcml_main(["dev", "--state-dir", str(tmp_path), "status"]) == 0
    assert f"no services recorded in {tmp_path}" in capsys.readouterr().out
    assert cfcml_main(["dev", "--state-dir", str(tmp_path), "status", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert cfcml_main(["dev", "--state-dir", str(tmp_path), "stop"]) == 0  # all: nothing recorded, nothing said
    assert capsys.readouterr().out == ""
    assert cfcml_main(["dev", "--state-dir", str(tmp_path), "stop", "ray"]) == 0
    assert "ray: not running" in capsys.readouterr().out
    assert cfcml_main(["dev", "--state-dir", str(tmp_path), "env", "mlflow"]) == 1


def test_dev_start_without_a_name_starts_the_make_run_stack_with_env_defaults(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(name):
        def start(state_dir, **kwargs):
            calls.append((name, Path(state_dir), kwargs))
            return services.Service(
                name=name,
                pid=1,
                url=f"http://127.0.0.1/{name}",
                address="a",
                port=1,
                log_path="log",
                marker="m",
                state_dir=str(state_dir),
                client_env={"K": name},
            )

        return start

    monkeypatch.setattr(services.dev, "start_mlflow_server", fake("mlflow"))  # what `cfcml dev start` calls
    monkeypatch.setattr(services.dev, "start_ray_head", fake("ray"))
    monkeypatch.setenv("CFCML_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("CFCML_MLFLOW_PORT", "5123")
    monkeypatch.setenv("CFCML_RAY_NUM_CPUS", "3")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert cfcml_main(["dev", "start"]) == 0
    assert [(name, state) for name, state, _ in calls] == [("mlflow", tmp_path), ("ray", tmp_path)]
    assert calls[0][2]["port"] == 5123 and calls[0][2]["host"] == "127.0.0.1"
    assert (
        calls[1][2]["num_cpus"] == 3 and calls[1][2]["auth_mode"] == "token" and calls[1][2]["dashboard_port"] == 8265
    )
    assert (tmp_path / "ray.env").read_text() == "export K=ray\n"  # what scripts/run.sh sources
    assert "mlflow: started (pid 1)" in capsys.readouterr().out
    monkeypatch.setenv("CFCML_MLFLOW_PORT", "not-a-port")
    with pytest.raises(SystemExit):
        cfcml_main(["dev", "start", "mlflow"])
    assert "invalid int value: 'not-a-port'" in capsys.readouterr().err


def test_tune_help_is_quick_to_read(tmp_path):
    """`cfcml tune --help` reads only the study's spec and options: torch, Ray and MLflow stay
    unimported (they took seconds before the user saw the help)."""
    import subprocess

    probe = (
        "import sys\n"
        "from cfcml.cli.main import main\n"
        "try:\n"
        "    main(['tune', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'ray', 'mlflow', 'monai') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert "--num-samples" in out.stdout, out.stderr
    assert "HEAVY []" in out.stdout
