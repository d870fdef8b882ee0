"""CCRM losses vs. a brute-force float64 reference (explicit loops), plus DDP."""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cfcml.models.ccrm import ccrm_losses, ccrm_losses_distributed, gather_with_grad

TAU = 0.07


# --------------------------------------------------------------------------- reference
def _unit(v):
    return v / v.norm()


def _ell(a, pos, neg):
    """-log(sum_P s / (sum_P s + sum_N s)) with s = exp(cos/tau), literally."""
    sp = sum(torch.exp(torch.dot(a, p) / TAU) for p in pos)
    sn = sum((torch.exp(torch.dot(a, n) / TAU) for n in neg), torch.zeros((), dtype=a.dtype))
    return -torch.log(sp / (sp + sn))


def reference(features, labels, num_classes):
    """Brute force from SPEC §3 wording; loops over anchors, positives, negatives."""
    M, B = len(features), len(labels)
    y = [int(v) for v in labels]
    z = [[_unit(features[j][i]) for i in range(B)] for j in range(M)]
    classes = [c for c in range(num_classes) if c in y]
    members = {c: [i for i in range(B) if y[i] == c] for c in classes}
    up = {(j, c): _unit(sum(z[j][i] for i in members[c]) / len(members[c])) for j in range(M) for c in classes}
    cp = {c: _unit(sum(z[j][i] for j in range(M) for i in members[c]) / (M * len(members[c]))) for c in classes}

    sam = 0.0
    for j in range(M):
        for c in classes:
            terms = []
            for i in members[c]:
                pos = [cp[c]] + [up[(jj, c)] for jj in range(M)]
                neg = [z[j][k] for k in range(B) if y[k] != c]
                terms.append(_ell(z[j][i], pos, neg))
            sam = sam + sum(terms) / len(terms)
    up_loss = 0.0
    for c in classes:
        terms = []
        for j in range(M):
            neg = [up[(jj, cc)] for jj in range(M) for cc in classes if cc != c]
            terms.append(_ell(up[(j, c)], [cp[c]], neg))
        up_loss = up_loss + sum(terms) / M
    cp_terms = []
    for c in classes:
        pos = [up[(j, c)] for j in range(M)]
        neg = [cp[cc] for cc in classes if cc != c]
        cp_terms.append(_ell(cp[c], pos, neg))
    cp_loss = sum(cp_terms) / len(cp_terms)
    return {"sam": sam, "up": up_loss, "cp": cp_loss}


def _make(M, labels, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # A class-dependent offset makes the losses non-trivial (not all ~log(#P+#N)).
    centers = torch.randn(M, 8, D, generator=g, dtype=dtype)
    return [
        (centers[j, labels] + 1.5 * torch.randn(len(labels), D, generator=g, dtype=dtype)).requires_grad_()
        for j in range(M)
    ]


def _check_against_reference(feats64, labels, K, rtol=1e-4, atol=1e-5):
    feats32 = [f.detach().float().requires_grad_() for f in feats64]
    ref = reference(feats64, labels, K)
    out = ccrm_losses(feats32, labels, K, TAU)
    for key in ("sam", "up", "cp"):
        assert out[key].dtype == torch.float32 and out[key].dim() == 0
        torch.testing.assert_close(
            out[key].double(),
            torch.as_tensor(ref[key], dtype=torch.float64),
            rtol=rtol,
            atol=atol,
        )
        if not torch.is_tensor(ref[key]) or not ref[key].requires_grad:  # constant 0 in the reference
            g = torch.autograd.grad(out[key], feats32, allow_unused=True)
            assert all(x is None or torch.all(x == 0) for x in g)
            continue
        g_ref = torch.autograd.grad(ref[key], feats64, retain_graph=True)
        g = torch.autograd.grad(out[key], feats32, retain_graph=True)
        for a, b in zip(g, g_ref):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("M", [3, 4])
@pytest.mark.parametrize("K", [2, 3])
def test_matches_reference(M, K):
    labels = torch.tensor([i % K for i in range(7)] + [0])  # uneven class sizes
    _check_against_reference(_make(M, labels, seed=10 * M + K), labels, K)


def test_missing_class_matches_reference_and_no_nan():
    labels = torch.tensor([0, 3, 3, 0, 0, 3])  # classes 1, 2 absent of K=4
    feats = _make(3, labels, seed=5)
    _check_against_reference(feats, labels, 4)


def test_single_class_is_exact_zero_with_zero_grad():
    labels = torch.full((5,), 2)
    feats = [f.detach().float().requires_grad_() for f in _make(4, labels, seed=1)]
    out = ccrm_losses(feats, labels, 3, TAU)
    for key, v in out.items():
        assert v.item() == 0.0, key
        assert v.requires_grad, key
    grads = torch.autograd.grad(sum(out.values()), feats)
    for g in grads:
        assert torch.isfinite(g).all() and torch.all(g == 0)


def test_bf16_autocast_close():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 32, generator=g)
    lins = [torch.nn.Linear(32, 16) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = [lin(x[j]) for j, lin in enumerate(lins)]
        assert feats[0].dtype == torch.bfloat16
        out = ccrm_losses(feats, labels, 3, TAU)
    ref = reference([f.detach().double() for f in feats], labels, 3)  # same bf16 inputs
    for key in out:
        assert out[key].dtype == torch.float32
        assert math.isclose(out[key].item(), float(ref[key]), rel_tol=1e-4, abs_tol=1e-5)
    sum(out.values()).backward()
    assert all(torch.isfinite(p.grad).all() for lin in lins for p in lin.parameters())


def test_distributed_falls_back_without_process_group():
    labels = torch.tensor([0, 1, 1, 0])
    feats = [f.detach().float() for f in _make(3, labels)]
    assert gather_with_grad(feats[0]) is feats[0]
    a, b = (
        ccrm_losses_distributed(feats, labels, 2, TAU),
        ccrm_losses(feats, labels, 2, TAU),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- DDP
WEIGHTS = {"sam": 0.06, "up": 0.04, "cp": 0.24}


class _Encoders(torch.nn.Module):
    def __init__(self, M=3, d_in=12, d=16):
        super().__init__()
        self.lins = torch.nn.ModuleList(torch.nn.Linear(d_in, d) for _ in range(M))

    def forward(self, x):  # x: [b, M, d_in] -> M x [b, d]
        return [lin(x[:, j]) for j, lin in enumerate(self.lins)]


def _ddp_worker(rank, world, init_file, splits):
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        K = 3
        for sizes in splits:
            torch.manual_seed(0)
            B = sum(sizes)
            x = torch.randn(B, 3, 12)
            labels = torch.arange(B) % K
            labels[-1] = 0  # uneven classes
            rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))

            # Single process on the concatenated batch.
            torch.manual_seed(1)
            ref_model = _Encoders()
            ref_feats = [f.detach().requires_grad_() for f in ref_model(x)]
            ref_out = ccrm_losses(ref_feats, labels, K, TAU)
            ref_total = sum(WEIGHTS[k] * v for k, v in ref_out.items())
            ref_fgrad = torch.autograd.grad(ref_total, ref_feats)
            ref_model.zero_grad()
            sum(WEIGHTS[k] * v for k, v in ccrm_losses(ref_model(x), labels, K, TAU).items()).backward()

            # DDP: each rank sees only its rows.
            torch.manual_seed(1)
            model = torch.nn.parallel.DistributedDataParallel(_Encoders())
            feats = model(x[rows])
            for f in feats:
                f.retain_grad()
            out = ccrm_losses_distributed(feats, labels[rows], K, TAU)
            for k in out:  # same global value on every rank
                torch.testing.assert_close(out[k], ref_out[k], rtol=1e-5, atol=1e-6)
            sum(WEIGHTS[k] * v for k, v in out.items()).backward()

            # Documented convention: local feature grads = W x single-process grads of those rows ...
            for f, g in zip(feats, ref_fgrad):
                torch.testing.assert_close(f.grad, world * g[rows], rtol=1e-4, atol=1e-6)
            # ... so DDP's averaged parameter grads equal the single-process ones, unscaled.
            for p, q in zip(model.module.parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    finally:
        dist.barrier()  # a rank leaving while the other still talks aborts gloo at exit
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_distributed_matches_single_process(tmp_path):
    world = 2
    # file:// rendezvous: no TCP port to clash with other tests.
    mp.spawn(
        _ddp_worker,
        args=(world, str(tmp_path / "rdzv"), [(5, 5), (6, 3)]),
        nprocs=world,
        join=True,
    )
