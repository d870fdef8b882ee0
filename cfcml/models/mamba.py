"""Mamba-1 block with a pure-PyTorch selective scan (and mamba-ssm's kernels when present).

``Mamba`` has exactly the parameters of ``mamba_ssm.Mamba`` (``in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj``), so checkpoints move freely between machines with and without
the compiled kernels. On CUDA tensors with ``mamba_ssm`` importable the fused kernels run;
everywhere else ``selective_scan`` below does.

The scan solves the linear recurrence h_t = a_t * h_{t-1} + b_t with a log-depth odd/even
(Blelloch-style) reduction: ~log2(L) vectorised levels, no Python loop over time steps. The
decays a_t = exp(delta_t * A) are used one step at a time and only ever multiplied together,
so with A < 0 nothing is larger than 1 (no exp of a positive cumulative sum, no overflow).
The backward pass is the same recurrence run in reverse, so autograd keeps only a and h.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["Mamba", "selective_scan"]


# ---------------------------------------------------------------------------- scan


def _scan(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Inclusive scan of h_t = a_t * h_{t-1} + b_t along dim 0, h_{-1} = 0.

    a, b: [L, ...] (same shape). Returns h: [L, ...], written into ``out`` if given (any
    strided view: the recursion writes each level straight into its slots, no interleaving
    copies). Time is the leading dim so each strided slice is a run of contiguous rows.
    """
    n = a.shape[0]
    if out is None:
        out = torch.empty_like(b)
    if n == 1:
        return out.copy_(b)
    a_even, a_odd = a[0 : n - 1 : 2], a[1::2]
    b_even, b_odd = b[0 : n - 1 : 2], b[1::2]
    # Fold each pair (2i, 2i+1) into one step; scanning the pairs gives h at odd positions.
    _scan(a_odd * a_even, torch.addcmul(b_odd, a_odd, b_even), out=out[1::2])
    # Each even position is one step on from the odd state before it (zero before t=0).
    out[0] = b[0]
    if n > 2:
        torch.addcmul(b[2::2], a[2::2], out[1 : n - 1 : 2], out=out[2::2])
    return out


class _LinearRecurrence(torch.autograd.Function):
    """h = scan(a, b) with a hand-written backward (another scan, run back to front)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        h = _scan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor):
        a, h = ctx.saved_tensors
        # g_t = dLoss/dh_t (total) = grad_h_t + a_{t+1} g_{t+1}: the recurrence reversed.
        # In reversed time step s uses a_{L-s}; step 0 acts on a zero state, so a_rev[0] is free.
        a_rev = torch.empty_like(a)
        a_rev[0] = 0
        a_rev[1:] = a[1:].flip(0)
        g = _scan(a_rev, grad_h.flip(0)).flip(0)
        grad_a = torch.empty_like(a)
        grad_a[0] = 0  # h_{-1} = 0
        torch.mul(g[1:], h[:-1], out=grad_a[1:])
        return grad_a, g


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Pure-PyTorch twin of ``mamba_ssm``'s ``selective_scan_fn`` (input-dependent B and C).

    u, delta: [B, D, L]; A: [D, N] (real); B, C: [B, N, L]; D, delta_bias: [D]; z: [B, D, L].
    Per channel d and state n:  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
    y_t = <C_t, h_t> + D u_t, then y *= silu(z).
    Returns y [B, D, L] in u's dtype (and the last state [B, D, N] if return_last_state).
    Computes in float32, or float64 when the inputs are float64.
    """
    if B.dim() != 3 or C.dim() != 3:
        raise ValueError(
            "selective_scan supports input-dependent B, C of shape [B, N, L] only"
        )
    dtype_in = u.dtype
    ct = torch.promote_types(dtype_in, torch.float32)
    u, delta, A, B, C = (t.to(ct) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    # Time-major layout [L, B, D, N] for the scan.
    dt = delta.permute(2, 0, 1)  # [L, B, D]
    a = torch.exp(dt.unsqueeze(-1) * A)  # [L, B, D, N]
    b = (dt * u.permute(2, 0, 1)).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2)
    h = _LinearRecurrence.apply(a, b)  # [L, B, D, N]
    # <C_t, h_t> as a broadcast product and sum: on CPU ~1.4x faster than einsum's bmm here.
    y = (h * C.permute(2, 0, 1).unsqueeze(2)).sum(-1).permute(1, 2, 0)  # [B, D, L]

    if D is not None:
        y = y + u * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    y = y.to(dtype_in)
    return (y, h[-1]) if return_last_state else y


# ---------------------------------------------------------------------------- block


def _at_least_f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


@functools.cache
def _fused_ops() -> SimpleNamespace | None:
    """mamba-ssm's CUDA kernels, or None when they do not import (imported once, lazily)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import (
            mamba_inner_fn,
            selective_scan_fn,
        )
    except ImportError:
        return None
    try:  # mamba_inner_fn additionally needs causal-conv1d's kernel
        from causal_conv1d import causal_conv1d_fn  # noqa: F401

        has_conv = True
    except ImportError:
        has_conv = False
    return SimpleNamespace(
        mamba_inner_fn=mamba_inner_fn if has_conv else None,
        selective_scan_fn=selective_scan_fn,
    )


class Mamba(nn.Module):
    """Mamba-1 block, parameter-compatible with ``mamba_ssm.Mamba``.

    On CUDA, mamba-ssm's kernels run when they import (``use_kernels=False`` opts out).
    forward: hidden_states [B, L, d_model] -> [B, L, d_model].
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_kernels: bool = True,
    ):
        super().__init__()
        # False forces the pure-PyTorch path (tests, benchmarks).
        self.use_kernels = use_kernels
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias
        )
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)

        # As mamba_ssm: small dt_proj weights, and a bias with softplus(bias) log-uniform
        # in [dt_min, dt_max], so the initial step sizes span short and long memories.
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        lo, hi = math.log(dt_min), math.log(dt_max)
        dt = torch.exp(lo + torch.rand(d_inner) * (hi - lo)).clamp(min=dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_softplus_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real: A = -[1, 2, ..., N] for every channel, stored as log(-A).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(d_inner))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def _causal_conv(self, x: Tensor) -> Tensor:
        """Causal depthwise conv with ``conv1d``'s weights, x [B, d_inner, L] -> same shape.

        Written as d_conv shifted multiply-adds: same result as ``conv1d(x)[..., :L]``, but
        CPU autograd of a depthwise Conv1d is several times slower than these few products.
        """
        k, seqlen = self.d_conv, x.shape[-1]
        w = self.conv1d.weight[:, 0]  # [d_inner, k]
        x = F.pad(x, (k - 1, 0))
        out = sum(w[:, i, None] * x[..., i : i + seqlen] for i in range(k))
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return out

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch, seqlen, _ = hidden_states.shape
        # [B, 2*d_inner, L] with L contiguous: the layout the conv and the kernels expect.
        xz = self.in_proj.weight @ hidden_states.reshape(-1, self.d_model).t()
        xz = xz.view(-1, batch, seqlen).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        # A, D and the dt bias stay in (at least) float32 even under low-precision weights.
        A = -torch.exp(_at_least_f32(self.A_log))  # [d_inner, N]
        D, dt_bias = _at_least_f32(self.D), _at_least_f32(self.dt_proj.bias)

        # The kernels take fp32/fp16/bf16; float64 (used by the reference tests) stays here.
        use_kernels = (
            self.use_kernels
            and hidden_states.is_cuda
            and hidden_states.dtype != torch.float64
        )
        fused = _fused_ops() if use_kernels else None
        if fused is not None and fused.mamba_inner_fn is not None:
            return fused.mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,  # input-dependent B
                None,  # input-dependent C
                D,
                delta_bias=dt_bias,
                delta_softplus=True,
            )

        x, z = xz.chunk(2, dim=1)
        x = F.silu(self._causal_conv(x))
        x_dbl = self.x_proj(x.transpose(1, 2))  # [B, L, R + 2N]
        dt, B, C = torch.split(
            x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1
        )
        dt = (dt @ self.dt_proj.weight.t()).transpose(
            1, 2
        )  # [B, d_inner, L]; bias goes in the scan
        B = B.transpose(1, 2).contiguous()  # [B, N, L]
        C = C.transpose(1, 2).contiguous()
        scan = fused.selective_scan_fn if fused is not None else selective_scan
        y = scan(
            x,
            dt.contiguous(),
            A,
            B,
            C,
            D,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
