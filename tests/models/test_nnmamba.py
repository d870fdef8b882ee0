"""3D nnMamba encoder: stage shapes, size, shared Mamba layers, gradient flow (SPEC §2)."""

from __future__ import annotations

import torch

from cfcml.models.mamba import Mamba
from cfcml.models.nnmamba import NNMambaEncoder3D


def test_men_stage_shapes():
    torch.manual_seed(0)
    enc = NNMambaEncoder3D().eval()
    assert enc.stage_channels == [16, 32, 64, 128]
    with torch.no_grad():
        feats = enc(torch.randn(1, 1, 24, 128, 128))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (16, 12, 64, 64),
        (32, 6, 32, 32),
        (64, 3, 16, 16),
        (128, 2, 8, 8),
    ]
    assert all(torch.isfinite(f).all() for f in feats)


def test_parameter_count_near_paper():
    n = sum(p.numel() for p in NNMambaEncoder3D().parameters())
    assert abs(n - 3.42e6) / 3.42e6 < 0.03, n


def test_mamba_layer_shared_by_blocks_2_and_3():
    enc = NNMambaEncoder3D(base_channels=4)
    # Registered once: no parameter reachable under two names, one key set per stage.
    unique = list(enc.named_parameters())
    assert len(list(enc.named_parameters(remove_duplicate=False))) == len(unique)
    mamba_keys = [k for k in enc.state_dict() if ".mamba." in k]
    assert {k.split(".mamba_layer.")[0] for k in mamba_keys} == {
        "stages.0",
        "stages.1",
        "stages.2",
    }
    assert all("blocks" not in k for k in mamba_keys)
    # ... and run by blocks 2 and 3 of each stage.
    calls = {i: 0 for i in range(3)}
    for i, stage in enumerate(enc.stages):
        stage.mamba_layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    enc(torch.randn(2, 1, 8, 32, 32))
    assert calls == {0: 2, 1: 2, 2: 2}


def test_smoke_size_shapes_and_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    enc = NNMambaEncoder3D(in_channels=1, base_channels=4)
    feats = enc(torch.randn(2, 1, 8, 32, 32))
    assert [tuple(f.shape) for f in feats] == [
        (2, 4, 4, 16, 16),
        (2, 8, 2, 8, 8),
        (2, 16, 1, 4, 4),
        (2, 32, 1, 2, 2),
    ]
    # Random weights: a plain sum would cancel through the BatchNorms.
    loss = sum((f * torch.randn_like(f)).sum() for f in feats)
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_scan_impl_reaches_every_mamba_block_and_checkpoints_load_across_impls():
    from cfcml.config import build_config
    from cfcml.models.cfcml import build_image_encoder

    encs = {}
    for impl in ("chunked", "logdepth"):
        torch.manual_seed(0)
        encs[impl] = build_image_encoder(build_config("men-smoke", [f"model.scan_impl={impl}"])).eval()
        blocks = [m for m in encs[impl].modules() if isinstance(m, Mamba)]
        assert len(blocks) == 3 and all(b.scan_impl == impl for b in blocks)
    state = encs["chunked"].state_dict()
    assert encs["logdepth"].state_dict().keys() == state.keys()
    encs["logdepth"].load_state_dict(state, strict=True)
    x = torch.randn(2, 1, 8, 32, 32)
    with torch.no_grad():
        for a, b in zip(encs["chunked"](x), encs["logdepth"](x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
