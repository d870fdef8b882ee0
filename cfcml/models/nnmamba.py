"""nnMamba-style 3D encoder (SPEC §2): a residual 3D CNN with shared Mamba branches.

Input [B, in_channels, D, H, W]; output four stage maps with channels C, 2C, 4C, 8C at
strides 2, 4, 8, 16 (rounded up). For MEN (1x24x128x128, C=16):
[16, 12, 64, 64], [32, 6, 32, 32], [64, 3, 16, 16], [128, 2, 8, 8].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cfcml.models.mamba import Mamba

__all__ = ["MambaLayer3D", "NNMambaEncoder3D"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv3d (no bias: BN follows) + BatchNorm3d."""
    conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm3d(cout))


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(cin, cout, kernel, stride), nn.ReLU(inplace=True))


class MambaLayer3D(nn.Module):
    """Volume -> sequence Mamba branch, four scan directions with shared weights.

    x [B, C, D, H, W] -> [B, C, D, H, W]:
    1x1x1 conv+BN+ReLU -> tokens [B, L, C] -> mean over {identity, channel flip, sequence flip,
    both} of flip^-1(Mamba(flip(tokens))) -> + tokens -> back to a volume -> 1x1x1 conv+BN+ReLU.
    """

    # (flip dims on [B, L, C]) for: as is, channel-reversed, sequence-reversed, both.
    _FLIPS = ((), (2,), (1,), (1, 2))

    def __init__(self, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, scan_impl: str = "auto"):
        super().__init__()
        self.proj_in = _conv_bn_relu(channels, channels, 1)
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, scan_impl=scan_impl)
        self.proj_out = _conv_bn_relu(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj_in(x)
        b, c, *grid = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # [B, L, C]
        # One Mamba call on the four directions stacked along the batch.
        views = torch.cat([tokens.flip(d) if d else tokens for d in self._FLIPS])
        outs = self.mamba(views).chunk(len(self._FLIPS))
        mixed = sum(o.flip(d) if d else o for o, d in zip(outs, self._FLIPS))
        mixed = mixed / len(outs)
        out = (mixed + tokens).transpose(1, 2).reshape(b, c, *grid)
        return self.proj_out(out)


class BasicBlock3D(nn.Module):
    """conv3x3x3-BN-ReLU-conv3x3x3-BN + shortcut (+ optional extra branch), then ReLU.

    x [B, cin, D, H, W] -> [B, cout, ceil(D/s), ceil(H/s), ceil(W/s)]. The extra branch
    (a stage's shared MambaLayer3D) is passed to forward rather than stored, so a module
    shared by two blocks is registered once, by the stage.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.convs = nn.Sequential(*_conv_bn_relu(cin, cout, 3, stride), *_conv_bn(cout, cout, 3))
        needs_proj = stride != 1 or cin != cout
        self.shortcut = _conv_bn(cin, cout, 1, stride) if needs_proj else nn.Identity()

    def forward(self, x: Tensor, extra: nn.Module | None = None) -> Tensor:
        out = self.convs(x) + self.shortcut(x)
        if extra is not None:
            out = out + extra(x)
        return torch.relu(out)


class ResidualStage3D(nn.Module):
    """Basic blocks (the first with stride 2); blocks 2.. share one ``mamba_layer``."""

    def __init__(self, cin: int, cout: int, num_blocks: int, **mamba_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(
            [BasicBlock3D(cin, cout, stride=2)] + [BasicBlock3D(cout, cout) for _ in range(num_blocks - 1)]
        )
        self.mamba_layer = MambaLayer3D(cout, **mamba_kwargs) if num_blocks > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, self.mamba_layer if i > 0 else None)
        return x


class NNMambaEncoder3D(nn.Module):
    """Four-stage 3D feature extractor (SPEC §2, one per MRI series).

    x [B, in_channels, D, H, W] -> [f1, f2, f3, f4] with channels ``stage_channels`` and
    spatial sizes D/2, D/4, D/8, D/16 (rounded up; likewise H, W). ``scan_impl``: the Mamba
    branches' selective scan (auto | chunked | logdepth, see ``cfcml.models.mamba``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 16,
        blocks_per_stage: int = 3,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        scan_impl: str = "auto",
    ):
        super().__init__()
        c = base_channels
        self.stage_channels = [c, 2 * c, 4 * c, 8 * c]
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, c, 3, stride=2), *_conv_bn_relu(c, c, 3))
        mamba_kwargs = {"d_state": d_state, "d_conv": d_conv, "expand": expand, "scan_impl": scan_impl}
        self.stages = nn.ModuleList(
            ResidualStage3D(cin, cout, blocks_per_stage, **mamba_kwargs)
            for cin, cout in zip(self.stage_channels[:-1], self.stage_channels[1:])
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats
