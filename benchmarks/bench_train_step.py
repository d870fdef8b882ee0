"""Training-step throughput of a preset's model (forward + CCRM loss + backward + Adam step).

    python benchmarks/bench_train_step.py --preset men --batch 36 [--steps 10] [--device cuda]

On CUDA it runs under bf16 autocast (as training does), reports samples/s and peak memory,
and first checks the CUDA bf16 logits against the CPU fp32 logits on one fixed input (eval
mode) — the end-to-end correctness check of the GPU path (mamba-ssm kernels when installed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfcml.config import build_config
from cfcml.datasets.spec import load_spec
from cfcml.engine.loss import compute_loss
from cfcml.engine.schedule import build_optimizer
from cfcml.models.cfcml import build_model
from cfcml.models.summary import example_inputs


def _to(inputs: dict, device) -> dict:
    return {
        "images": None if inputs["images"] is None else [x.to(device) for x in inputs["images"]],
        "tabular": None if inputs["tabular"] is None else inputs["tabular"].to(device),
    }


def check_against_cpu(cfg, model_cpu, device) -> float:
    """Max |logit difference| / max |logit| between CPU fp32 and `device` bf16, eval mode."""
    torch.manual_seed(0)
    x = example_inputs(cfg, load_spec(cfg.dataset).shape(), batch=2)
    model_cpu.eval()
    with torch.no_grad():
        ref = model_cpu(**x)["logits"]
        model_dev = build_model(cfg, load_spec(cfg.dataset).shape(), num_tabular_features=16).to(device).eval()
        model_dev.load_state_dict(model_cpu.state_dict())
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model_dev(**_to(x, device))["logits"].float().cpu()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="men")
    p.add_argument("--batch", type=int, default=36)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    cfg = build_config(args.preset, args.overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg, load_spec(cfg.dataset).shape(), num_tabular_features=16)
    if device.type == "cuda":
        print(f"cuda bf16 vs cpu fp32 logits: max relative difference {check_against_cpu(cfg, model, device):.4f}")
    model = model.to(device).train()
    optimizer, _ = build_optimizer(model, cfg.train)
    inputs = _to(example_inputs(cfg, load_spec(cfg.dataset).shape(), batch=args.batch), device)
    num_classes = load_spec(cfg.dataset).shape().num_classes
    labels = torch.arange(args.batch, device=device) % num_classes
    amp = device.type == "cuda"
    times = []
    for step in range(args.steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(**inputs)
        loss = compute_loss(out, labels, cfg, num_classes)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:  # the first steps pay for allocation and autotuning
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"{args.preset} batch {args.batch} on {device} ({'bf16 autocast' if amp else 'fp32'}): "
          f"{med * 1e3:.1f} ms/step, {args.batch / med:.1f} samples/s")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
