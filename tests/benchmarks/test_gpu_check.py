"""benchmarks/gpu_check.sh runs on a machine without CUDA (its CUDA checks SKIP, exit 0), and
each check's comparison works: run here on the CPU at small sizes, the same functions pass,
and a tolerance too tight to hold makes a check FAIL."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
LINE = re.compile(r"^(PASS|FAIL|SKIP) ([\w-]+): (.+)$")
CHECKS = [
    "deps",
    "parity-men-smoke",
    "parity-derm7pt-smoke",
    "train-step-men",
    "mamba-kernel",
    "device-bank",
    "device-train",
]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


@pytest.mark.slow
def test_the_script_on_a_machine_without_cuda_skips_the_cuda_checks_and_exits_0(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if not line.startswith("#")]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [m.group(2) for m in parsed] == CHECKS
    status = {m.group(2): m.group(1) for m in parsed}
    assert status["deps"] == "PASS" and "no CUDA" in parsed[0].group(3)
    assert all(status[name] == "SKIP" for name in CHECKS[1:]), lines
    assert done.stdout.splitlines()[-1].startswith("# 1 passed, 0 failed, 6 skipped")


def test_asking_for_cuda_without_it_fails(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 1
    assert capsys.readouterr().out.startswith("FAIL device: cuda asked for, but torch")


@pytest.mark.slow
def test_parity_passes_within_the_stated_tolerance_and_fails_when_it_is_too_tight(gpu_check):
    """On the CPU the check compares CPU bf16 autocast with CPU fp32: the same code path as
    CUDA bf16; a tolerance of zero must catch the bf16 rounding."""
    ok = gpu_check.check_parity("derm7pt-smoke", CPU)
    assert ok.status == "PASS" and ok.name == "parity-derm7pt-smoke", ok.line()
    numbers = [float(x) for x in re.findall(r"max\|dlogit\| ([\d.e-]+)", ok.detail)]
    assert numbers and 0 < numbers[0] < 0.05, ok.detail  # bf16 rounding is there, and small
    tight = gpu_check.check_parity("derm7pt-smoke", CPU, logit_tol=(0.0, 0.0))
    assert tight.status == "FAIL" and "max|dlogit|" in tight.detail


def test_the_mamba_comparison_agrees_for_two_exact_scans(gpu_check):
    r = gpu_check.mamba_compare("logdepth", "chunked", CPU, seq_len=128, d_model=8, batch=2, repeats=1)
    assert r["out"] < 1e-5 and r["grad"] < 1e-5 and set(r["seconds"]) == {"logdepth", "chunked"}
    if importlib.util.find_spec("mamba_ssm") is None:
        assert gpu_check.check_mamba(CPU).status == "SKIP"


def test_the_device_bank_check_passes_on_the_cpu(gpu_check):
    r = gpu_check.check_device_bank(CPU, size=(4, 16, 16), batch=3)
    assert r.status == "PASS" and "6 cases x 3 x 4x16x16" in r.detail, r.line()


def test_a_bank_that_ignores_the_seed_is_caught(gpu_check, monkeypatch):
    from cfcml.datasets import volume_augment

    monkeypatch.setattr(volume_augment.DeviceBatches, "manual_seed", lambda self, seed: None)  # seed has no effect
    r = gpu_check.bank_check(CPU, size=(4, 16, 16), cases=6, series=2, batch=3)
    assert r["problems"] == ["the same seed gave different batches"]


def test_the_train_step_is_timed_with_a_finite_loss(gpu_check):
    r = gpu_check.check_train_step(CPU, budget_s=5, preset="men-smoke", batch=2)
    assert r.status == "PASS" and re.search(r"batch 2, fp32, scan chunked: [\d.]+ ms/step", r.detail), r.line()


@pytest.mark.slow
def test_one_epoch_through_the_device_resident_loader(gpu_check):
    r = gpu_check.check_device_train(CPU)
    assert r.status == "PASS" and "via DeviceBatches (bank on cpu)" in r.detail, r.line()
