"""Mamba-1 block: mamba-ssm's fused kernels when present, a pure-PyTorch selective scan otherwise.

``Mamba`` has exactly the parameters of ``mamba_ssm.Mamba`` (``in_proj, conv1d, x_proj,
dt_proj, A_log, D, out_proj``), so checkpoints move freely between machines and between scan
implementations. ``scan_impl`` picks the scan: ``auto`` runs mamba-ssm's fused kernels on CUDA
tensors when they import and the chunked pure-PyTorch scan everywhere else; ``chunked`` and
``logdepth`` force a pure-PyTorch scan (see ``cfcml.models.selective_scan``).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .selective_scan import DEFAULT_CHUNK, SCAN_IMPLS, selective_scan, selective_scan_bld

__all__ = ["MAMBA_SCAN_IMPLS", "Mamba", "selective_scan"]

MAMBA_SCAN_IMPLS = ("auto", *SCAN_IMPLS)


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

    scan_impl: auto (mamba-ssm's kernels on CUDA when they import, else chunked) | chunked |
    logdepth. forward: hidden_states [B, L, d_model] -> [B, L, d_model].
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
        scan_impl: str = "auto",
        chunk_size: int = DEFAULT_CHUNK,
    ):
        super().__init__()
        if scan_impl not in MAMBA_SCAN_IMPLS:
            raise ValueError(f"scan_impl must be one of {MAMBA_SCAN_IMPLS}, got {scan_impl!r}")
        self.scan_impl = scan_impl
        self.chunk_size = chunk_size
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        d_inner = self.d_inner

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=conv_bias)
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
        """Causal depthwise conv with ``conv1d``'s weights along dim 1: x [B, L, d_inner] -> same.

        Written as d_conv shifted multiply-adds: same result as ``conv1d`` over time cut to L,
        but CPU autograd of a depthwise Conv1d is several times slower than these few products.
        """
        k, seqlen = self.d_conv, x.shape[1]
        # [k, d_inner], contiguous rows (a strided weight row halves the multiply's speed);
        # tap k-1 sees the current step.
        w = self.conv1d.weight[:, 0].t().contiguous()
        x = F.pad(x, (0, 0, k - 1, 0))
        bias = self.conv1d.bias
        out = x[:, k - 1 :] * w[k - 1] if bias is None else torch.addcmul(bias, x[:, k - 1 :], w[k - 1])
        for i in range(k - 1):
            out = torch.addcmul(out, x[:, i : i + seqlen], w[i])
        return out

    def _fused(self, hidden_states: Tensor):
        """mamba-ssm's kernels when this call may use them (CUDA, a kernel dtype), else None."""
        if self.scan_impl != "auto" or not hidden_states.is_cuda or hidden_states.dtype == torch.float64:
            return None
        return _fused_ops()

    def forward(self, hidden_states: Tensor) -> Tensor:
        # A, D and the dt bias stay in (at least) float32 even under low-precision weights.
        A = -torch.exp(_at_least_f32(self.A_log))  # [d_inner, N]
        D, dt_bias = _at_least_f32(self.D), _at_least_f32(self.dt_proj.bias)
        fused = self._fused(hidden_states)
        if fused is not None:
            return self._forward_fused(hidden_states, fused, A, D, dt_bias)

        # Pure PyTorch, time on dim 1 throughout: [B, L, channels], no transposes.
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # [B, L, d_inner] each
        x = F.silu(self._causal_conv(x))
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = dt @ self.dt_proj.weight.t()  # [B, L, d_inner]; the bias is added in float32 in the scan
        impl = "chunked" if self.scan_impl == "auto" else self.scan_impl
        y = selective_scan_bld(
            x, dt, A, B, C, D, z=z, delta_bias=dt_bias, delta_softplus=True, impl=impl, chunk_size=self.chunk_size
        )
        return self.out_proj(y)

    def _forward_fused(self, hidden_states: Tensor, fused: SimpleNamespace, A: Tensor, D: Tensor, dt_bias: Tensor):
        """mamba-ssm's kernels, in their [B, channels, L] layout."""
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj.weight @ hidden_states.reshape(-1, self.d_model).t()
        xz = xz.view(-1, batch, seqlen).transpose(0, 1)
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias.to(xz.dtype)[:, None]
        if fused.mamba_inner_fn is not None:
            # mamba-ssm's kernel takes its tensors positionally: mirrored as its API has them
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
        x = F.silu(self.conv1d(x)[..., :seqlen])
        x_dbl = self.x_proj(x.transpose(1, 2))  # [B, L, R + 2N]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # [B, d_inner, L]; bias in the kernel
        y = fused.selective_scan_fn(
            x,
            dt.contiguous(),
            A,
            B.transpose(1, 2).contiguous(),  # [B, N, L]
            C.transpose(1, 2).contiguous(),
            D,
            z=z,
            delta_bias=dt_bias,
            delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))
