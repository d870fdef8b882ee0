"""Training-step throughput of a preset's model, per selective-scan implementation, in one run.

    python benchmarks/bench_train_step.py --preset men --batch 2 [--steps 3] [--impls logdepth,chunked]
    python benchmarks/bench_train_step.py --preset men --batch 36 --device cuda

A step is forward + CCRM loss + backward + Adam step. One line per scan implementation, the
configuration's own (`model.scan_impl`, `auto` unless --set) last:

    men batch 2 on cpu (fp32), scan logdepth: 1234.5 ms/step, 1.62 samples/s, 90.1 GFLOP/s, 84.2 % of peak

GFLOP/s counts the model's forward FLOPs (torch.utils.flop_counter: convolutions, matrix
products, attention; not the element-wise work of the scans) x 3 for forward + backward; the
peak is a 2048x2048 float32 matmul on CPU (an 8192x8192 bf16 matmul on CUDA) timed in the same
run with the same threads. The last line also gives its speed-up over the others. On CUDA
the step runs under bf16 autocast (as training does) and the CUDA bf16 logits are first
checked against the CPU fp32 logits (eval mode, one fixed input).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

# Idle OpenMP threads sleep instead of spinning: on a machine with more busy threads than cores
# (a shared box) spinning makes every short parallel region wait for a descheduled thread,
# which slows the chunked scan (thousands of small regions per step) by up to 30x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import torch
from torch.utils.flop_counter import FlopCounterMode

from cfcml.config import build_config
from cfcml.datasets.spec import load_spec
from cfcml.engine.schedule import build_optimizer
from cfcml.models.cfcml import build_model
from cfcml.models.mamba import _fused_ops
from cfcml.models.pretrained import without_pretrained_weights
from cfcml.models.summary import example_inputs


def _shape(cfg):
    return load_spec(cfg.dataset).shape()


def _with_scan(cfg, impl: str):
    # random weights: a benchmark times the model, it needs no pretrained checkpoint
    return without_pretrained_weights(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan_impl=impl)))


def _to(inputs: dict, device) -> dict:
    return {
        "images": None if inputs["images"] is None else [x.to(device) for x in inputs["images"]],
        "tabular": None if inputs["tabular"] is None else inputs["tabular"].to(device),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gflops(device, repeats: int = 10) -> tuple[float, str]:
    """Median matmul rate: 2048^2 float32 on CPU, 8192^2 bf16 on CUDA."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9, f"{n}x{n} {str(dtype).removeprefix('torch.')} matmul"


def forward_gflops(cfg, batch: int) -> float:
    """The model's forward GFLOPs at this batch (counted at batch 1 on CPU, times the batch)."""
    model = build_model(_with_scan(cfg, "chunked"), _shape(cfg), num_tabular_features=16).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**example_inputs(cfg, _shape(cfg), batch=1))
    return counter.get_total_flops() / 1e9 * batch


def check_against_cpu(cfg, device) -> float:
    """Max |logit difference| / max |logit| between CPU fp32 and `device` bf16, eval mode."""
    torch.manual_seed(0)
    model_cpu = build_model(cfg, _shape(cfg), num_tabular_features=16).eval()
    x = example_inputs(cfg, _shape(cfg), batch=2)
    with torch.no_grad():
        ref = model_cpu(**x)["logits"]
        model_dev = build_model(cfg, _shape(cfg), num_tabular_features=16).to(device).eval()
        model_dev.load_state_dict(model_cpu.state_dict())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model_dev(**_to(x, device))["logits"].float().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def time_steps(cfg, args, device) -> float:
    """Median seconds per training step (after `args.warmup` untimed steps)."""
    torch.manual_seed(0)
    model = build_model(cfg, _shape(cfg), num_tabular_features=16).to(device).train()
    optimizer, _ = build_optimizer(model, cfg.train)
    inputs = _to(example_inputs(cfg, _shape(cfg), batch=args.batch), device)
    num_classes = _shape(cfg).num_classes
    labels = torch.arange(args.batch, device=device) % num_classes
    amp = device.type == "cuda"
    times = []
    for step in range(args.warmup + args.steps):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(**inputs)
        loss = model.loss_terms(out, labels, epoch=0)["loss"]  # the method's own objective, as the engine
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        if step >= args.warmup:  # the first steps pay for allocation and autotuning
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="men")
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (3 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (1 on CPU, 3 on CUDA)")
    p.add_argument("--impls", default="logdepth,chunked", help="scan implementations besides the config's own")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (10 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    cfg = build_config(args.preset, args.overrides)
    own = cfg.model.scan_impl
    auto_is = "mamba-ssm" if cuda and _fused_ops() is not None else "chunked"
    resolved = {"auto": auto_is}
    impls = [i for i in args.impls.split(",") if i and resolved.get(own, own) != i]

    peak, peak_what = peak_gflops(device)
    gflop = 3 * forward_gflops(cfg, args.batch)
    omp = os.environ["OMP_WAIT_POLICY"]
    threads = f", {torch.get_num_threads()} threads, OMP_WAIT_POLICY={omp}" if not cuda else ""
    print(f"peak: {peak_what} {peak:.1f} GFLOP/s{threads}; train step {gflop:.1f} GFLOP (3 x forward)")
    if cuda:
        print(f"cuda bf16 vs cpu fp32 logits: max relative difference {check_against_cpu(cfg, device):.4f}")

    results = {}
    for impl in [*impls, own]:
        sec = time_steps(_with_scan(cfg, impl), args, device)
        results[impl] = sec
        label = f"auto ({auto_is})" if impl == "auto" else impl
        extra = []
        if cuda:
            extra.append(f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
            torch.cuda.reset_peak_memory_stats(device)
        if impl == own:
            extra += [f"{results[o] / sec:.1f}x faster than {o}" for o in impls]
        print(
            f"{args.preset} batch {args.batch} on {device} ({'bf16 autocast' if cuda else 'fp32'}), scan {label}: "
            f"{sec * 1e3:.1f} ms/step, {args.batch / sec:.2f} samples/s, {gflop / sec:.1f} GFLOP/s, "
            f"{gflop / sec / peak:.1%} of peak" + (f" ({'; '.join(extra)})" if extra else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
