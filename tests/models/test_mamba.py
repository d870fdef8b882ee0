"""Mamba block and selective scan against brute-force step-by-step references (float64)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from cfcml.models.mamba import Mamba, selective_scan
from cfcml.models.selective_scan import DEFAULT_CHUNK

F64 = torch.float64


def scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The recurrence one time step at a time. u, delta [b, d, L]; A [d, n]; B, C [b, n, L]."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        dt = delta[:, :, t, None]  # [b, d, 1]
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def random_scan_inputs(b=2, d=5, n=3, L=37, seed=0, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    return {
        "u": r(b, d, L),
        "delta": delta_scale * torch.rand(b, d, L, generator=g, dtype=F64),
        "A": -torch.rand(d, n, generator=g, dtype=F64) * 4 - 0.1,
        "B": r(b, n, L),
        "C": r(b, n, L),
        "D": r(d),
        "z": r(b, d, L),
        "delta_bias": r(d) * 0.5,
    }


OPTIONS = [
    {},
    {"D": True},
    {"z": True},
    {"delta_bias": True, "delta_softplus": True},
    {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    {"D": True, "z": True, "delta_softplus": True},
]


# (impl, chunk_size): a small chunk so that L = 37, 64, 129 cross chunk boundaries (129 also
# ends in a partial chunk), the default chunk, and the log-depth scan.
IMPLS = [("chunked", 16), ("chunked", DEFAULT_CHUNK), ("logdepth", DEFAULT_CHUNK)]
IMPL_IDS = ["chunked16", "chunked", "logdepth"]


@pytest.mark.parametrize("impl,chunk", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("L", [1, 2, 37, 64, 129])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_selective_scan_matches_sequential_values_and_grads(L, opts, impl, chunk):
    full = random_scan_inputs(L=L, seed=L)
    names = ["u", "delta", "A", "B", "C"] + [k for k in ("D", "z", "delta_bias") if opts.get(k)]
    inputs = {k: full[k].clone().requires_grad_() for k in names}
    softplus = opts.get("delta_softplus", False)

    y = selective_scan(**inputs, delta_softplus=softplus, impl=impl, chunk_size=chunk)
    y_ref, _ = scan_reference(**inputs, delta_softplus=softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(y_ref)
    leaves = list(inputs.values())
    grads = torch.autograd.grad(y, leaves, grad_out)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_out)
    for name, g, g_ref in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("impl,chunk", IMPLS, ids=IMPL_IDS)
def test_selective_scan_last_state_values_and_grads(impl, chunk):
    x = {k: v.requires_grad_() for k, v in random_scan_inputs(L=50).items()}
    y, last = selective_scan(**x, delta_softplus=True, return_last_state=True, impl=impl, chunk_size=chunk)
    y_ref, last_ref = scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(last, last_ref, rtol=1e-10, atol=1e-10)
    # A loss on the last state alone and on both outputs: the state's gradient enters the
    # backward at the end of the sequence (through the padded tail of the last chunk).
    g_y, g_last = torch.randn_like(y), torch.randn_like(last)
    for loss, loss_ref in [
        ((last * g_last).sum(), (last_ref * g_last).sum()),
        ((y * g_y).sum() + (last * g_last).sum(), (y_ref * g_y).sum() + (last_ref * g_last).sum()),
    ]:
        # (D and z do not reach the state: zero gradients)
        kw = {"retain_graph": True, "allow_unused": True, "materialize_grads": True}
        grads = torch.autograd.grad(loss, list(x.values()), **kw)
        grads_ref = torch.autograd.grad(loss_ref, list(x.values()), **kw)
        for name, g, g_ref in zip(x, grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


def _realistic_inputs(L, dtype, seed=0, b=2, d=16, n=16):
    """Mamba's init ranges: delta = softplus(bias + small) in ~[1e-3, 0.1] with A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    dt_init = torch.exp(torch.rand(d, generator=g, dtype=F64) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x = {
        "u": r(b, d, L),
        "delta": r(b, d, L) * 0.5,
        "A": -torch.arange(1, n + 1, dtype=F64).repeat(d, 1),
        "B": r(b, n, L),
        "C": r(b, n, L),
        "D": r(d),
        "z": r(b, d, L),
        "delta_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
    }
    return {k: v.to(dtype) for k, v in x.items()}


@pytest.mark.parametrize("impl,chunk", IMPLS, ids=IMPL_IDS)
def test_selective_scan_float32_long_sequence_values_and_grads(impl, chunk):
    # 700 steps with long memories (delta down to 1e-3): float32 error must not build up over
    # the chunks. Reference: the step loop in float64 on the same (float32) inputs.
    x32 = {k: v.requires_grad_() for k, v in _realistic_inputs(700, torch.float32).items()}
    x64 = {k: v.detach().double().requires_grad_() for k, v in x32.items()}
    y = selective_scan(**x32, delta_softplus=True, impl=impl, chunk_size=chunk)
    y_ref, _ = scan_reference(**x64, delta_softplus=True)
    assert y.dtype == torch.float32
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5 * scale)
    g = torch.randn_like(y_ref)
    grads = torch.autograd.grad(y, list(x32.values()), g.float())
    grads_ref = torch.autograd.grad(y_ref, list(x64.values()), g)
    for name, gr, gr_ref in zip(x32, grads, grads_ref):
        assert gr.dtype == torch.float32
        torch.testing.assert_close(gr.double(), gr_ref, rtol=1e-3, atol=1e-4 * gr_ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("impl,chunk", IMPLS, ids=IMPL_IDS)
def test_selective_scan_bfloat16_inputs(impl, chunk):
    # bf16 inputs are scanned in float32 and the output rounded to bf16 (8 bits of mantissa):
    # within 2^-7 of the float64 reference's largest value; gradients likewise in bf16.
    xb = {k: v.requires_grad_() for k, v in _realistic_inputs(300, torch.bfloat16, seed=1).items()}
    x64 = {k: v.detach().double().requires_grad_() for k, v in xb.items()}
    y = selective_scan(**xb, delta_softplus=True, impl=impl, chunk_size=chunk)
    y_ref, _ = scan_reference(**x64, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    tol = 2.0**-7
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    g = torch.randn_like(y_ref).bfloat16()
    grads = torch.autograd.grad(y, list(xb.values()), g)
    grads_ref = torch.autograd.grad(y_ref, list(x64.values()), g.double())
    for name, gr, gr_ref in zip(xb, grads, grads_ref):
        assert gr.dtype == torch.bfloat16
        torch.testing.assert_close(gr.double(), gr_ref, rtol=tol, atol=tol * gr_ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("impl,chunk", IMPLS, ids=IMPL_IDS)
def test_selective_scan_stable_with_strong_decay(impl, chunk):
    # delta * A down to about -150 per step: exp of a cumulative sum of log-decays would
    # overflow float32 within one step; the scan must stay finite and exact, gradients too.
    x = random_scan_inputs(L=300, delta_scale=40.0)
    x32 = {k: v.float().requires_grad_() for k, v in x.items()}
    y = selective_scan(**x32, impl=impl, chunk_size=chunk)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(x32.values()), g)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(gr).all() for gr in grads)
    x64 = {k: v.requires_grad_() for k, v in x.items()}
    y_ref, _ = scan_reference(**x64)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    grads_ref = torch.autograd.grad(y_ref, list(x64.values()), g.double())
    for name, gr, gr_ref in zip(x32, grads, grads_ref):
        torch.testing.assert_close(gr.double(), gr_ref, rtol=1e-3, atol=1e-4 * gr_ref.abs().max().item(), msg=name)


def _largest_saved(fn) -> int:
    """Elements of the largest tensor that autograd keeps for the backward of fn()."""
    saved = [0]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fn()
    return max(saved)


def test_chunked_scan_keeps_no_full_state_sequence_for_backward():
    # The chunked backward rebuilds each chunk from the state that entered it: autograd keeps
    # tensors of the inputs' sizes ([B, L, D], [B, L, N]) and one state per chunk, never a
    # [B, D, N, L] sequence of decays or states as the log-depth scan does.
    b, d, n, L = 2, 32, 16, 1024
    x = {k: v.float().requires_grad_() for k, v in random_scan_inputs(b=b, d=d, n=n, L=L).items()}
    full = b * d * n * L
    assert _largest_saved(lambda: selective_scan(**x, delta_softplus=True, impl="logdepth")) == full
    assert _largest_saved(lambda: selective_scan(**x, delta_softplus=True, impl="chunked")) <= full // n


def test_selective_scan_rejects_unknown_impl():
    with pytest.raises(ValueError, match="unknown scan implementation"):
        selective_scan(**random_scan_inputs(L=4), impl="fast")


# ------------------------------------------------------------------------------ block

MAMBA_SSM_SHAPES = {  # mamba_ssm.Mamba(d_model=8, d_state=4, d_conv=4, expand=2)
    "in_proj.weight": (32, 8),
    "conv1d.weight": (16, 1, 4),
    "conv1d.bias": (16,),
    "x_proj.weight": (1 + 2 * 4, 16),
    "dt_proj.weight": (16, 1),
    "dt_proj.bias": (16,),
    "A_log": (16, 4),
    "D": (16,),
    "out_proj.weight": (8, 16),
}


def test_mamba_state_dict_matches_mamba_ssm_names_and_init():
    m = Mamba(8, d_state=4)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == MAMBA_SSM_SHAPES
    torch.testing.assert_close(m.A_log.exp(), torch.arange(1.0, 5.0).repeat(16, 1))
    assert torch.equal(m.D, torch.ones(16))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


def test_mamba_output_shape_and_default_sizes():
    m = Mamba(32)  # d_inner 64, dt_rank 2, d_state 16
    assert m.x_proj.weight.shape == (2 + 32, 64)
    assert m(torch.randn(3, 11, 32)).shape == (3, 11, 32)


def test_causal_conv_equals_conv1d():
    m = Mamba(8).double()
    x = torch.randn(2, 9, 16, dtype=F64)  # [B, L, d_inner]
    ref = m.conv1d(x.transpose(1, 2))[..., :9].transpose(1, 2)
    torch.testing.assert_close(m._causal_conv(x), ref)


def test_mamba_rejects_unknown_scan_impl():
    with pytest.raises(ValueError, match="scan_impl"):
        Mamba(8, scan_impl="fast")


def mamba_block_reference(m: Mamba, x):
    """The block one time step at a time. x [b, L, d_model] -> [b, L, d_model]."""
    di, k, R, N = m.d_inner, m.d_conv, m.dt_rank, m.d_state
    xz = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    xs, z = xz[..., :di], xz[..., di:]
    w = m.conv1d.weight[:, 0]  # [di, k]; tap k-1 sees the current step
    A = -torch.exp(m.A_log)
    h = x.new_zeros(x.shape[0], di, N)
    outs = []
    for t in range(x.shape[1]):
        c = m.conv1d.bias.clone()
        for i in range(k):
            if t - (k - 1) + i >= 0:
                c = c + w[:, i] * xs[:, t - (k - 1) + i]
        c = F.silu(c)  # [b, di]
        dbl = c @ m.x_proj.weight.t()
        dt_in, Bt, Ct = dbl[:, :R], dbl[:, R : R + N], dbl[:, R + N :]
        dt = F.softplus(dt_in @ m.dt_proj.weight.t() + m.dt_proj.bias)  # [b, di]
        h = torch.exp(dt[..., None] * A) * h + (dt * c)[..., None] * Bt[:, None]
        y = (h * Ct[:, None]).sum(-1) + m.D * c
        y = y * F.silu(z[:, t])
        outs.append(F.linear(y, m.out_proj.weight, m.out_proj.bias))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("scan_impl", ["auto", "chunked", "logdepth"])
@pytest.mark.parametrize("bias", [False, True])
def test_mamba_forward_and_grads_match_step_by_step(bias, scan_impl):
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, bias=bias, scan_impl=scan_impl, chunk_size=5).double()
    with torch.no_grad():  # larger dt than the init, so the state really carries over
        m.dt_proj.bias.add_(2.0)
    x = torch.randn(2, 13, 8, dtype=F64, requires_grad=True)
    y = m(x)
    y_ref = mamba_block_reference(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    leaves = [x, *m.parameters()]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_checkpoints_load_across_scan_implementations():
    # Same keys whatever the scan, and a strict load into another implementation gives the
    # same outputs and gradients (float32, a sequence of several default-size chunks).
    torch.manual_seed(0)
    models = {impl: Mamba(16, scan_impl=impl) for impl in ("auto", "chunked", "logdepth")}
    state = models["chunked"].state_dict()
    assert all(m.state_dict().keys() == state.keys() for m in models.values())
    for m in models.values():
        m.load_state_dict(state, strict=True)
    x = torch.randn(2, 3 * DEFAULT_CHUNK + 5, 16)
    outs, grads = {}, {}
    for impl, m in models.items():
        outs[impl] = m(x)
        grads[impl] = torch.autograd.grad(outs[impl].square().sum(), list(m.parameters()))
    torch.testing.assert_close(outs["auto"], outs["chunked"], rtol=0, atol=0)  # auto is chunked on CPU
    torch.testing.assert_close(outs["logdepth"], outs["chunked"], rtol=1e-5, atol=1e-5)
    for g_log, g_chunk in zip(grads["logdepth"], grads["chunked"]):
        torch.testing.assert_close(g_log, g_chunk, rtol=1e-4, atol=1e-4 * g_chunk.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["chunked", "logdepth"])
def test_pure_pytorch_scans_on_cuda_match_cpu(impl):
    x = {k: v.float().requires_grad_() for k, v in random_scan_inputs(L=300).items()}
    xc = {k: v.detach().cuda().requires_grad_() for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=True, impl=impl)
    yc = selective_scan(**xc, delta_softplus=True, impl=impl)
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(x.values()), g)
    grads_cuda = torch.autograd.grad(yc, list(xc.values()), g.cuda())
    for gr, grc in zip(grads, grads_cuda):
        torch.testing.assert_close(grc.cpu(), gr, rtol=1e-3, atol=1e-4 * gr.abs().max().item())


@pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm")),
    reason="needs CUDA and mamba-ssm",
)
def test_fused_kernels_match_pytorch_path():
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    x = {k: v.float().cuda() for k, v in random_scan_inputs(L=300).items()}
    torch.testing.assert_close(
        selective_scan_fn(**x, delta_softplus=True),
        selective_scan(**x, delta_softplus=True),
        rtol=1e-3,
        atol=1e-3,
    )
    m = Mamba(16).cuda()
    h = torch.randn(2, 200, 16, device="cuda")
    fused = m(h)
    cpu = m.cpu()(h.cpu())
    torch.testing.assert_close(fused.cpu(), cpu, rtol=1e-3, atol=1e-3)
