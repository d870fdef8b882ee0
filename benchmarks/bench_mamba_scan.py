"""Time forward+backward of one Mamba block at MEN's longest sequence (L = 6144).

    python benchmarks/bench_mamba_scan.py [--seq-len 6144 --d-model 32 --batch 2 --repeats 5]

Prints the median wall time per forward+backward on CPU (pure-PyTorch scan) and, when CUDA
is available, on the GPU with the pure-PyTorch scan and with mamba-ssm's kernels (if they
import), plus the peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfcml.models.mamba import Mamba, _fused_ops


def bench(device: str, use_kernels: bool, args) -> tuple[float, float | None]:
    """Median seconds per forward+backward, and peak CUDA memory in MiB (None on CPU)."""
    torch.manual_seed(0)
    m = Mamba(args.d_model, use_kernels=use_kernels).to(device)
    x = torch.randn(
        args.batch, args.seq_len, args.d_model, device=device, requires_grad=True
    )
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
    return statistics.median(times), peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=6144)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(
        f"Mamba(d_model={args.d_model}, d_state=16, expand=2), batch {args.batch}, "
        f"L {args.seq_len}, forward+backward, median of {args.repeats}"
    )
    runs = [("cpu", False, f"cpu  pytorch scan ({torch.get_num_threads()} threads)")]
    if torch.cuda.is_available():
        runs.append(("cuda", False, "cuda pytorch scan"))
        if _fused_ops() is not None:
            runs.append(("cuda", True, "cuda mamba-ssm kernels"))
    for device, kernels, label in runs:
        sec, peak = bench(device, kernels, args)
        mem = f"  peak {peak:8.1f} MiB" if peak is not None else ""
        print(f"{label:40s} {sec * 1e3:9.1f} ms{mem}")


if __name__ == "__main__":
    main()
