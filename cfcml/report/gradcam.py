"""Grad-CAM (Selvaraju et al. 2017) over any torch module whose output is a feature map.

    heat = ReLU(sum_c alpha_c A_c),  alpha_c = mean over the grid of d logit_k / d A_c

for the target layer's map A [B, C, *grid] (2D or 3D), upsampled to the input grid and
scaled to [0, 1] per sample. The layer's output is swapped for a detached copy that
requires grad, so frozen encoders and an outer `torch.no_grad()` work, and gradients come
from `torch.autograd.grad`: no parameter's `.grad` is touched, the module's train/eval mode
is left alone, and the hook is removed even when the model raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _cam(activation: Tensor, grad: Tensor, output_size: Sequence[int] | None) -> Tensor:
    """[B, C, *grid] map and its gradient -> [B, *output_size] heatmap in [0, 1]."""
    dims = tuple(range(2, activation.ndim))
    weights = grad.mean(dim=dims, keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1, keepdim=True))
    if output_size is not None and tuple(cam.shape[2:]) != tuple(output_size):
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[cam.ndim - 2]
        cam = F.interpolate(cam, size=tuple(output_size), mode=mode, align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).max(dim=1).values.clamp_min(torch.finfo(cam.dtype).tiny)
    return (cam / peak.view(-1, *([1] * (cam.ndim - 1)))).detach()


def grad_cam(
    run: Callable[[], Tensor | dict],
    target_layer: nn.Module,
    class_index: int | Sequence[int] | Tensor,
    output_size: Sequence[int] | None = None,
    output_index: int | None = None,
    channels_last: bool = False,
) -> list[Tensor]:
    """Grad-CAM heatmaps of `class_index` for every call of `target_layer` during `run()`.

    run: runs the model on a batch and returns logits [B, K] (or a dict with "logits"), e.g.
      `lambda: model(images, tabular)`.
    target_layer: the module whose output is the feature map [B, C, *grid]; when it returns a
      list/tuple of maps (our encoders return four stages), `output_index` picks one.
    class_index: one class for the whole batch or one per sample ([B]).
    output_size: the input grid (H, W) or (D, H, W) to upsample to; None keeps the map's grid.
    channels_last: the map is [B, *grid, C] (timm Swin stages before our permute).

    -> one [B, *output_size] tensor in [0, 1] per call of the layer, in call order (a shared
    2D encoder runs once per photo, so two photos give two heatmaps). Same device as the
    model, detached.
    """
    captured: list[Tensor] = []

    def hook(_module, _inputs, output):
        maps = list(output) if isinstance(output, list | tuple) else [output]
        i = 0 if output_index is None else output_index
        leaf = maps[i].detach().requires_grad_(True)
        captured.append(leaf)
        maps[i] = leaf.clone()  # a non-leaf view downstream, so in-place ops there stay legal
        if isinstance(output, list | tuple):
            return type(output)(maps) if isinstance(output, tuple) else maps
        return maps[0]

    handle = target_layer.register_forward_hook(hook)
    with torch.enable_grad():  # also under an outer no_grad
        try:
            out = run()
        finally:
            handle.remove()
        logits = out["logits"] if isinstance(out, dict) else out
        if not captured:
            raise RuntimeError("the target layer was not called while running the model")
        idx = torch.as_tensor(class_index, device=logits.device).long().expand(logits.shape[0])
        score = logits.gather(1, idx.view(-1, 1)).sum()  # samples are independent in eval mode
        grads = torch.autograd.grad(score, captured, allow_unused=True)
    heatmaps = []
    for activation, grad in zip(captured, grads):
        grad = torch.zeros_like(activation) if grad is None else grad
        if channels_last:
            activation, grad = activation.movedim(-1, 1), grad.movedim(-1, 1)
        heatmaps.append(_cam(activation.detach(), grad, output_size))
    return heatmaps
