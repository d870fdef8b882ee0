"""One-shot GPU check for a session lent a GPU: does cfcml train correctly and fast on CUDA?

    PYTHONPATH=. python benchmarks/gpu_check.py [--device cuda] [--budget-s 420]
    benchmarks/gpu_check.sh                    (the same, with the offline settings)

Prints one line per check, `PASS|FAIL|SKIP name: detail`, and exits 1 when any check FAILs
(0 otherwise). Nothing is installed or downloaded (random-init weights, synthetic tensors).
On a machine without CUDA every CUDA check prints SKIP and the exit status is 0.

Checks (expected to take 3-6 minutes on one H100; not yet run on a GPU):
  deps                 cfcml and its model/data dependencies import (mamba-ssm is optional)
  parity-<preset>      men-smoke and derm7pt-smoke, random init, eval mode, one fixed batch:
                       CUDA bf16 autocast vs CPU fp32 on the same weights. Tolerances:
                       max|dlogit| <= 0.05 * max|logit_cpu| + 0.01, |dloss| <= 0.05 * |loss_cpu| + 0.01
                       (bf16 keeps 8 significant bits: ~0.4 % per rounding, a few % through a
                       deep net); CUDA fp32 (TF32 off) vs CPU fp32 within 1e-3 relative
  train-step-men       the `men` preset's train step (forward + loss + backward + AdamW) at the
                       paper's batch (train.batch_size = 36) under bf16 autocast: ms/step,
                       samples/s, peak memory; FAIL on a non-finite loss or out of memory
  mamba-kernel         when `import mamba_ssm` works: the Mamba block through mamba-ssm's fused
                       kernels vs the chunked scan (same weights, fp32, L = 6144 as MEN's
                       stage 1): outputs and input gradients within 1e-3 relative, and the
                       time of each; SKIP when mamba-ssm does not import
  device-bank          the device-resident volume loader (data.device_augment): a bank of
                       men-sized volumes on the GPU, batches of 36 augmented there: shapes,
                       finite values, labels, same seed -> same batch; ms per batch
  device-train         one epoch of men-smoke on a synthetic MEN cohort with
                       data.device_augment=always on CUDA: the engine took the device path and
                       the loss is finite
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: every weight here is random
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # after the environment above

BF16_LOGIT_TOL = (0.05, 0.01)  # (relative to max|logit|, absolute)
BF16_LOSS_TOL = (0.05, 0.01)  # (relative to |loss|, absolute)
FP32_TOL = 1e-3  # CUDA fp32 (TF32 off) and the mamba kernel vs the chunked scan, relative to the max
MEN_BATCH = 36  # the paper's batch (the men preset's train.batch_size)
REQUIRED = ("yaml", "numpy", "timm", "open_clip", "monai", "nibabel", "tqdm", "cfcml.models.cfcml")


@dataclass
class Result:
    status: str  # PASS | FAIL | SKIP
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


def _close(diff: float, ref: float, tol: tuple[float, float]) -> bool:
    return diff <= tol[0] * ref + tol[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- the checks


def check_deps() -> Result:
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - report every module that does not import, whatever the reason
            missing.append(f"{name} ({type(e).__name__}: {e})")
    if missing:
        return Result(
            "FAIL", "deps", "does not import: " + "; ".join(missing) + " (install cfcml's dependencies first)"
        )
    from cfcml.models.mamba import _fused_ops

    kernels = "mamba-ssm kernels import" if _fused_ops() is not None else "mamba-ssm absent (chunked scan)"
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no CUDA"
    return Result("PASS", "deps", f"torch {torch.__version__}, {cuda}, {kernels}")


def _build(preset: str, overrides: list[str] = ()):
    from cfcml.config import build_config
    from cfcml.datasets.spec import load_spec
    from cfcml.models.cfcml import build_model
    from cfcml.models.pretrained import without_pretrained_weights

    cfg = without_pretrained_weights(build_config(preset, list(overrides)))
    shape = load_spec(cfg.dataset).shape()
    return cfg, shape, lambda: build_model(cfg, shape, num_tabular_features=16)


def _to(inputs: dict, device: torch.device) -> dict:
    """Model inputs ({"images": [tensors] or None, "tabular": tensor or None}) on `device`."""
    return {
        key: None if v is None else [x.to(device) for x in v] if isinstance(v, list) else v.to(device)
        for key, v in inputs.items()
    }


def _forward(model, inputs: dict, labels: torch.Tensor, device: torch.device, bf16: bool):
    moved = _to(inputs, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(**moved)
        loss = model.loss_terms(out, labels.to(device), epoch=0)["loss"]
    return out["logits"].float().cpu(), float(loss)


def parity(preset: str, device: torch.device, batch: int = 4, overrides: list[str] = ()) -> dict:
    """CPU fp32 vs `device` fp32 and bf16 autocast, same weights and batch, eval mode ->
    {"logits": max|dlogit| (bf16), "logit_scale": max|logit| (cpu), "loss": |dloss| (bf16),
     "loss_ref": cpu loss, "fp32": max|dlogit| / max|logit| with fp32 on `device`}."""
    from cfcml.models.summary import example_inputs

    cfg, shape, make = _build(preset, overrides)
    torch.manual_seed(0)
    cpu_model = make().eval()
    inputs = example_inputs(cfg, shape, batch=batch)
    labels = torch.arange(batch) % shape.num_classes
    ref, ref_loss = _forward(cpu_model, inputs, labels, torch.device("cpu"), bf16=False)
    model = make().to(device).eval()
    model.load_state_dict(cpu_model.state_dict())
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        fp32, _ = _forward(model, inputs, labels, device, bf16=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    bf16, bf16_loss = _forward(model, inputs, labels, device, bf16=True)
    scale = ref.abs().max().item()
    return {
        "logits": (bf16 - ref).abs().max().item(),
        "logit_scale": scale,
        "loss": abs(bf16_loss - ref_loss),
        "loss_ref": ref_loss,
        "fp32": (fp32 - ref).abs().max().item() / max(scale, 1e-6),
        "finite": bool(torch.isfinite(bf16).all()) and bool(torch.isfinite(torch.tensor(bf16_loss))),
    }


def check_parity(
    preset: str, device: torch.device, logit_tol: tuple = BF16_LOGIT_TOL, loss_tol: tuple = BF16_LOSS_TOL
) -> Result:
    name = f"parity-{preset}"
    r = parity(preset, device)
    ok = (
        r["finite"]
        and _close(r["logits"], r["logit_scale"], logit_tol)
        and _close(r["loss"], abs(r["loss_ref"]), loss_tol)
        and r["fp32"] <= FP32_TOL
    )
    detail = (
        f"bf16 max|dlogit| {r['logits']:.4g} (max|logit| {r['logit_scale']:.4g}, tol "
        f"{logit_tol[0]}x+{logit_tol[1]}), |dloss| {r['loss']:.4g} (loss {r['loss_ref']:.4g}, tol "
        f"{loss_tol[0]}x+{loss_tol[1]}); fp32 rel {r['fp32']:.2g} (tol {FP32_TOL:g})"
    )
    return Result("PASS" if ok else "FAIL", name, detail)


def time_train_step(
    preset: str, batch: int, device: torch.device, budget_s: float, overrides: list[str] = (), max_steps: int = 10
) -> dict:
    """Median seconds per train step (after one untimed step), timed steps until `budget_s` or
    `max_steps`; -> {"seconds", "steps", "loss", "peak_gib" (CUDA) }."""
    from cfcml.engine.schedule import build_optimizer
    from cfcml.models.summary import example_inputs

    cfg, shape, make = _build(preset, overrides)
    torch.manual_seed(0)
    model = make().to(device).train()
    optimizer, _ = build_optimizer(model, cfg.train)
    inputs = _to(example_inputs(cfg, shape, batch=batch), device)
    labels = torch.arange(batch, device=device) % shape.num_classes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, loss, start = [], float("nan"), time.perf_counter()
    for step in range(max_steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(**inputs)
        loss_t = model.loss_terms(out, labels, epoch=0)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss_t.backward()
        optimizer.step()
        _sync(device)
        loss = loss_t.item()
        if step > 0:
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s and times:
            break
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"seconds": statistics.median(times), "steps": len(times), "loss": loss, "peak_gib": peak}


def check_train_step(device: torch.device, budget_s: float, preset: str = "men", batch: int = MEN_BATCH) -> Result:
    name = f"train-step-{preset}"
    try:
        r = time_train_step(preset, batch, device, budget_s)
    except torch.OutOfMemoryError as e:
        return Result("FAIL", name, f"out of memory at batch {batch}: {str(e).splitlines()[0]}")
    from cfcml.models.mamba import _fused_ops

    scan = "mamba-ssm" if _fused_ops() is not None else "chunked"
    detail = (
        f"batch {batch}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, scan {scan}: "
        f"{r['seconds'] * 1e3:.1f} ms/step, {batch / r['seconds']:.2f} samples/s (median of {r['steps']}), "
        f"peak memory {r['peak_gib'] or 0:.2f} GiB, "
        f"loss {r['loss']:.4g}"
    )
    return Result("PASS" if torch.isfinite(torch.tensor(r["loss"])) else "FAIL", name, detail)


def mamba_compare(
    impl: str,
    ref_impl: str,
    device: torch.device,
    seq_len: int = 6144,
    d_model: int = 32,
    batch: int = 8,
    repeats: int = 5,
) -> dict:
    """One Mamba block with `impl` vs `ref_impl` (same weights, fp32): -> {"out", "grad": max
    relative differences, "seconds": {impl: median forward+backward seconds}}."""
    from cfcml.models.mamba import Mamba

    torch.manual_seed(0)
    ref_block = Mamba(d_model, scan_impl=ref_impl).to(device)
    block = Mamba(d_model, scan_impl=impl).to(device)
    block.load_state_dict(ref_block.state_dict())
    x = torch.randn(batch, seq_len, d_model, device=device)
    results, seconds = {}, {}
    for label, m in ((impl, block), (ref_impl, ref_block)):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().mean().backward()
        results[label] = (y.detach(), xi.grad.detach())
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            m.zero_grad(set_to_none=True)
            m(x.clone().requires_grad_(True)).square().mean().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds[label] = statistics.median(times)
    (y, g), (y_ref, g_ref) = results[impl], results[ref_impl]
    return {"out": _rel(y, y_ref), "grad": _rel(g, g_ref), "seconds": seconds}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_mamba(device: torch.device) -> Result:
    name = "mamba-kernel"
    try:
        import mamba_ssm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or an OSError/RuntimeError of a compiled extension
        return Result("SKIP", name, f"import mamba_ssm fails ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    from cfcml.models.mamba import _fused_ops

    ops = _fused_ops()
    if ops is None:
        return Result("FAIL", name, "mamba_ssm imports but its selective_scan kernels do not")
    r = mamba_compare("auto", "chunked", device)
    path = "mamba_inner_fn (causal-conv1d)" if ops.mamba_inner_fn is not None else "selective_scan_fn"
    ok = r["out"] <= FP32_TOL and r["grad"] <= FP32_TOL
    s = r["seconds"]
    detail = (
        f"{path} vs chunked, L 6144, fp32: output rel {r['out']:.2g}, input-grad rel {r['grad']:.2g} (tol "
        f"{FP32_TOL:g}); fwd+bwd {s['auto'] * 1e3:.2f} ms vs {s['chunked'] * 1e3:.2f} ms "
        f"({s['chunked'] / s['auto']:.1f}x)"
    )
    return Result("PASS" if ok else "FAIL", name, detail)


def bank_check(
    device: torch.device, size=(24, 128, 128), cases: int = 2 * MEN_BATCH, series: int = 3, batch: int = MEN_BATCH
) -> dict:
    """Batches from a device-resident bank of random volumes, augmented on `device` ->
    {"problems": [...], "ms_per_batch", "bank_gib"}."""
    from cfcml.datasets.volume_augment import BatchVolumeAugment, DeviceBatches, DeviceVolumeBank, chunked

    gen = torch.Generator().manual_seed(0)
    volumes = torch.rand(cases, series, *size, generator=gen)
    labels = torch.arange(cases) % 3
    bank = DeviceVolumeBank(volumes, labels, device)
    loader = DeviceBatches(bank, chunked(list(range(cases)), batch), BatchVolumeAugment(size, prob=0.5))
    problems, times, first = [], [], []
    for seed in (7, 7):
        loader.manual_seed(seed)
        _sync(device)
        t0 = time.perf_counter()
        batches = list(loader)
        _sync(device)
        times.append((time.perf_counter() - t0) / len(batches))
        first.append(batches[0])
    b = first[0]
    if bank.device.type != device.type:
        problems.append(f"bank on {bank.device}, not {device}")
    want = [min(batch, cases), 1, *size]
    if len(b["images"]) != series or any(list(x.shape) != want for x in b["images"]):
        problems.append(f"images {[list(x.shape) for x in b['images']]}, expected {series} x {want}")
    if any(x.device.type != device.type or not torch.isfinite(x).all() for x in b["images"]):
        problems.append("images not finite or not on the device")
    if not torch.equal(b["label"].cpu(), labels[b["index"]]):
        problems.append("labels do not follow the indices")
    if not all(torch.equal(x, y) for x, y in zip(first[0]["images"], first[1]["images"])):
        problems.append("the same seed gave different batches")
    return {"problems": problems, "ms_per_batch": min(times) * 1e3, "bank_gib": bank.nbytes / 2**30}


def check_device_bank(device: torch.device, size=(24, 128, 128), batch: int = MEN_BATCH) -> Result:
    name = "device-bank"
    r = bank_check(device, size, 2 * batch, 3, batch)
    shown = "x".join(map(str, size))
    detail = (
        f"{2 * batch} cases x 3 x {shown} ({r['bank_gib']:.2f} GiB), batch {batch}: {r['ms_per_batch']:.1f} ms/batch"
    )
    return Result("FAIL" if r["problems"] else "PASS", name, "; ".join(r["problems"]) or detail)


def device_train(device: torch.device, workdir: Path, patients: int = 24) -> dict:
    """One men-smoke epoch with data.device_augment=always on `device` -> {"loader", "bank_device", "loss", "seconds"}."""
    from cfcml.config import build_config
    from cfcml.datasets import write_synthetic
    from cfcml.engine.run import TrainingRun

    root = write_synthetic("men", workdir / "men", patients, seed=0)
    overrides = [
        "data.device_augment=always",
        f"train.device={device}",
        f"data.cache_dir={workdir / 'cache'}",
        "train.epochs=1",
        "train.select_min_epoch=0",
        "train.select_window=1",
    ]
    run = TrainingRun(build_config("men-smoke", overrides), root, workdir / "run", fold=1, progress=False)
    t0 = time.perf_counter()
    record = run.train_epoch()
    loader = run.train_loader
    bank = getattr(loader, "bank", None)
    return {
        "loader": type(loader).__name__,
        "bank_device": None if bank is None else bank.device.type,
        "loss": record.get("train_loss", float("nan")),
        "seconds": time.perf_counter() - t0,
    }


def check_device_train(device: torch.device) -> Result:
    name = "device-train"
    with tempfile.TemporaryDirectory(prefix="cfcml-gpu-check-") as tmp:
        r = device_train(device, Path(tmp))
    ok = r["loader"] == "DeviceBatches" and r["bank_device"] == device.type and torch.isfinite(torch.tensor(r["loss"]))
    detail = f"men-smoke epoch via {r['loader']} (bank on {r['bank_device']}): train loss {r['loss']:.4g}, {r['seconds']:.1f} s"
    return Result("PASS" if ok else "FAIL", name, detail)


# --------------------------------------------------------------------------- driver


def run_checks(device: torch.device, budget_s: float, emit: Callable[[Result], None]) -> list[Result]:
    """Every check in turn (an exception in one is its FAIL; the others still run); the CUDA
    checks SKIP on another device."""
    deps = check_deps()
    emit(deps)
    results = [deps]
    checks: list[tuple[str, Callable[[], Result]]] = [
        ("parity-men-smoke", lambda: check_parity("men-smoke", device)),
        ("parity-derm7pt-smoke", lambda: check_parity("derm7pt-smoke", device)),
        ("train-step-men", lambda: check_train_step(device, budget_s)),
        ("mamba-kernel", lambda: check_mamba(device)),
        ("device-bank", lambda: check_device_bank(device)),
        ("device-train", lambda: check_device_train(device)),
    ]
    for name, check in checks:
        if deps.status == "FAIL":
            result = Result("SKIP", name, "dependencies missing (see deps)")
        elif device.type != "cuda":
            result = Result("SKIP", name, "no CUDA device")
        else:
            try:
                result = check()
            except Exception as e:  # noqa: BLE001 - one line per check; the traceback goes to stderr
                traceback.print_exc(file=sys.stderr)
                result = Result("FAIL", name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        emit(result)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda or cuda:N (default: cuda when available; cpu: every CUDA check SKIPs)",
    )
    p.add_argument("--budget-s", type=float, default=90.0, help="seconds of timed men train steps at most")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"FAIL device: {args.device} asked for, but torch {torch.__version__} sees no CUDA device", flush=True)
        return 1
    t0 = time.perf_counter()
    results = run_checks(device, args.budget_s, lambda r: print(r.line(), flush=True))
    failed = [r.name for r in results if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(
        f"# {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {time.perf_counter() - t0:.0f} s"
        + (f" (failed: {', '.join(failed)})" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
