import json
import subprocess
import sys

import pytest

from cfcml.cli import main


def test_summary_json_reports_counts_flops_and_stages(capsys):
    assert main(["summary", "--preset", "men-smoke", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert {"trainable_params", "frozen_params", "gflops", "stages"} <= set(s)
    assert s["frozen_params"] > 60e6 and 0 < s["trainable_params"] < 2e6 and s["gflops"] > 0
    assert [st["feature_map"] for st in s["stages"]] == [[4, 4, 8, 8], [8, 2, 4, 4], [16, 1, 2, 2], [32, 1, 1, 1]]


@pytest.mark.slow
def test_summary_of_paper_presets_matches_the_paper_sizes(capsys):
    for preset, paper in [("men", 35.98e6), ("derm7pt", 29.66e6)]:
        assert main(["summary", "--preset", preset, "--json"]) == 0
        s = json.loads(capsys.readouterr().out)
        assert abs(s["trainable_params"] / paper - 1) < 0.02
    assert s["stages"][0]["feature_map"] == [96, 56, 56]


def test_bad_override_exits_2_with_the_key_named():
    r = subprocess.run(
        [sys.executable, "-m", "cfcml.cli", "summary", "--preset", "men-smoke", "--set", "model.dim=x"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "model.dim" in r.stderr


def test_data_check_json_and_exit_status(tmp_path, capsys):
    root = tmp_path / "d"
    assert main(["synth", "derm7pt", "--out", str(root), "--cases", "60", "--seed", "2"]) == 0
    capsys.readouterr()
    assert main(["data", "check", "derm7pt", "--root", str(root), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert set(counts) == {"splits"} and set(counts["splits"]) == {"train", "valid", "test"}
    assert set(counts["splits"]["train"]) == {"NEV", "MEL"}
    (root / "meta" / "meta.csv").write_text("garbage\n")
    assert main(["data", "check", "derm7pt", "--root", str(root)]) == 2
    assert "meta.csv" in capsys.readouterr().err


def test_cv_refuses_a_non_positive_job_count(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["cv", "--preset", "men-smoke", "--data", str(tmp_path), "--jobs", "0"])
    assert e.value.code == 2
    assert "--jobs: expected a positive whole number, got '0'" in capsys.readouterr().err
