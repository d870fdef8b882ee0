"""Time forward+backward of one Mamba block at MEN's longest sequence, per scan implementation.

    python benchmarks/bench_mamba_scan.py [--seq-len 6144 --d-model 32 --batch 8 --repeats 5]

The defaults are nnMamba's stage-1 block at training batch 2: L = 6144 tokens, d_model 32
(d_inner 64, d_state 16) and batch 8 = 2 volumes x 4 scan directions. For each
implementation (`chunked`, `logdepth`, and on CUDA mamba-ssm's fused kernels when they
import) it prints the median wall time per forward+backward, the tensors autograd keeps for
the backward (MiB) and, on CUDA, the peak memory; the last line gives the speed-up of the
chunked scan over the log-depth scan measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Idle OpenMP threads sleep instead of spinning: on a machine with more busy threads than cores
# (a shared box) spinning makes every short parallel region wait for a descheduled thread,
# which slows the chunked scan (thousands of small regions per step) by up to 30x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its OpenMP runtime

import torch

from cfcml.models.mamba import Mamba, _fused_ops


def saved_mib(m: Mamba, x: torch.Tensor) -> float:
    """MiB of the tensors autograd keeps for the backward of one forward."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    return sum(seen.values()) / 2**20


def bench(device: str, impl: str, args) -> tuple[float, float, float | None]:
    """Median seconds per forward+backward, saved MiB, peak CUDA memory in MiB (None on CPU)."""
    torch.manual_seed(0)
    m = Mamba(args.d_model, scan_impl=impl).to(device)
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, requires_grad=True)
    cuda = device.startswith("cuda")

    def step():
        m.zero_grad(set_to_none=True)
        m(x).square().mean().backward()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (kernel selection, allocator)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return statistics.median(times), saved_mib(m, x), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=6144)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(
        f"Mamba(d_model={args.d_model}, d_state=16, expand=2), batch {args.batch}, "
        f"L {args.seq_len}, forward+backward, median of {args.repeats}, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    runs = [("cpu", "logdepth"), ("cpu", "chunked")]
    if torch.cuda.is_available():
        runs += [("cuda", "logdepth"), ("cuda", "chunked")]
        if _fused_ops() is not None:
            runs.append(("cuda", "auto"))
    results = {}
    for device, impl in runs:
        sec, saved, peak = bench(device, impl, args)
        results[device, impl] = sec
        name = "mamba-ssm kernels" if impl == "auto" else f"{impl} scan"
        threads = f" ({torch.get_num_threads()} threads)" if device == "cpu" else ""
        mem = f"  peak {peak:8.1f} MiB" if peak is not None else ""
        print(f"{device:4s} {name:18s}{threads:12s} {sec * 1e3:9.1f} ms  saved {saved:8.1f} MiB{mem}", flush=True)
    for device in dict.fromkeys(d for d, _ in runs):
        ratio = results[device, "logdepth"] / results[device, "chunked"]
        print(f"{device}: chunked scan {ratio:.1f}x faster than logdepth")


if __name__ == "__main__":
    main()
