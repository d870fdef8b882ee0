"""Mamba block and selective scan against brute-force step-by-step references (float64)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from cfcml.models.mamba import Mamba, selective_scan

F64 = torch.float64


def scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False
):
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


@pytest.mark.parametrize("L", [1, 2, 37, 64, 129])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_selective_scan_matches_sequential_values_and_grads(L, opts):
    full = random_scan_inputs(L=L, seed=L)
    names = ["u", "delta", "A", "B", "C"] + [
        k for k in ("D", "z", "delta_bias") if opts.get(k)
    ]
    inputs = {k: full[k].clone().requires_grad_() for k in names}
    softplus = opts.get("delta_softplus", False)

    y = selective_scan(**inputs, delta_softplus=softplus)
    y_ref, _ = scan_reference(**inputs, delta_softplus=softplus)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    grad_out = torch.randn_like(y_ref)
    leaves = list(inputs.values())
    grads = torch.autograd.grad(y, leaves, grad_out)
    grads_ref = torch.autograd.grad(y_ref, leaves, grad_out)
    for name, g, g_ref in zip(inputs, grads, grads_ref):
        torch.testing.assert_close(
            g, g_ref, rtol=1e-9, atol=1e-9, msg=f"grad of {name}"
        )


def test_selective_scan_last_state_and_dtype():
    x = random_scan_inputs(L=50)
    _y, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    y_ref, last_ref = scan_reference(**x, delta_softplus=True)
    torch.testing.assert_close(last, last_ref)
    x32 = {k: v.float() for k, v in x.items()}
    y32 = selective_scan(**x32, delta_softplus=True)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y_ref, rtol=1e-4, atol=1e-4)


def test_selective_scan_stable_with_strong_decay():
    # delta * A down to about -150 per step: exp of the reversed cumulative sum would
    # overflow float32 within one or two steps; the scan must stay finite and exact.
    x = random_scan_inputs(L=300, delta_scale=40.0)
    x32 = {k: v.float().requires_grad_() for k, v in x.items()}
    y = selective_scan(**x32)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.grad).all() for v in x32.values())
    y_ref, _ = scan_reference(**x)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)


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
    x = torch.randn(2, 16, 9, dtype=F64)
    torch.testing.assert_close(m._causal_conv(x), m.conv1d(x)[..., :9])


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


@pytest.mark.parametrize("bias", [False, True])
def test_mamba_forward_and_grads_match_step_by_step(bias):
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, bias=bias).double()
    with torch.no_grad():  # larger dt than the init, so the state really carries over
        m.dt_proj.bias.add_(2.0)
    x = torch.randn(2, 13, 8, dtype=F64, requires_grad=True)
    y = m(x)
    y_ref = mamba_block_reference(m, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    leaves = [x, *m.parameters()]
    g = torch.randn_like(y)
    for a, b in zip(
        torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


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
