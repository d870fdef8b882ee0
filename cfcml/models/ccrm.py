"""CCRM: coarse-to-fine crossmodal relation mining losses (SPEC §3, Eqs. 6-13).

Notation: M modalities (tabular last), K classes, B samples, D feature size.
``z[j, i]`` is the L2-normalised feature of modality j of sample i; cosine
similarities are divided by tau and every per-anchor term

    l(a) = -log( sum_P s / (sum_P s + sum_N s) ),   s = exp(cos / tau)

is evaluated as ``softplus(LSE(N) - LSE(P))`` (identical to LSE(P u N) - LSE(P)),
so no raw exponential is ever formed. Classes absent from the batch are masked
out with ``torch.where`` on finite values, so neither the loss nor its gradient
can become NaN; an anchor without negatives (e.g. a one-class batch) contributes
an exact 0 that still carries a (zero) gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ccrm_losses", "ccrm_losses_distributed", "gather_with_grad"]


def _anchor_loss(pos: Tensor, neg: Tensor, neg_mask: Tensor) -> Tensor:
    """Per-anchor contrastive term from logits (cos / tau).

    pos: [..., P] positive logits (P >= 1, all valid).
    neg: [..., N] negative logits; neg_mask: [..., N] bool, True = valid negative.
    Returns [...]: softplus(LSE(valid neg) - LSE(pos)), exactly 0 where an anchor
    has no valid negative.
    """
    has_neg = neg_mask.any(-1)
    # Rows without negatives keep their (finite) logits so that LSE and its
    # backward stay finite; their result is discarded by the final where.
    keep = neg_mask | ~has_neg.unsqueeze(-1)
    lse_neg = neg.masked_fill(~keep, float("-inf")).logsumexp(-1)
    term = F.softplus(lse_neg - pos.logsumexp(-1))
    return torch.where(has_neg, term, torch.zeros_like(term))


def ccrm_losses(features: Sequence[Tensor], labels: Tensor, num_classes: int, tau: float = 0.07) -> dict[str, Tensor]:
    """CCRM losses on one batch (prototypes from this batch, gradients flowing).

    features: M tensors [B, D], one per modality (tabular last), any float dtype.
    labels: [B] int64 in [0, num_classes).
    Returns {"sam", "up", "cp"}: float32 scalars.
      sam: sum over modalities and present classes of the mean over that class's
           sample anchors (P = {cp^y, up_1^y..up_M^y}, N = same-modality samples
           of other classes).
      up:  sum over present classes of the mean over modalities of the
           unimodal-prototype anchors (P = {cp^l}, N = {up_j'^l' : l' != l}).
      cp:  mean over present classes of the crossmodal-prototype anchors
           (P = {up_1^l..up_M^l}, N = {cp^l' : l' != l}).
    """
    device = labels.device
    # Similarities in float32 even under bf16/fp16 autocast.
    with torch.autocast(device_type=device.type, enabled=False):
        z = F.normalize(torch.stack([f.float() for f in features]), dim=-1)  # [M, B, D]
        M = z.shape[0]
        onehot = F.one_hot(labels, num_classes).to(z.dtype)  # [B, K]
        count = onehot.sum(0)  # [K]
        present = count > 0  # [K]

        # Prototypes. Absent classes get a dummy finite direction (never used
        # unmasked) so that normalising a zero vector cannot inject NaN.
        class_sum = torch.einsum("bk,mbd->mkd", onehot, z)  # [M, K, D]
        up_mean = class_sum / count.clamp(min=1)[None, :, None]
        cp_mean = class_sum.sum(0) / (M * count.clamp(min=1))[:, None]  # [K, D]
        up = F.normalize(
            torch.where(present[None, :, None], up_mean, torch.ones_like(up_mean)),
            dim=-1,
        )
        cp = F.normalize(torch.where(present[:, None], cp_mean, torch.ones_like(cp_mean)), dim=-1)

        # --- sample anchors: z[j, i] -------------------------------------------
        y = labels
        pos_cp = torch.einsum("mbd,bd->mb", z, cp[y])  # [M, B]
        pos_up = torch.einsum("mbd,nbd->mbn", z, up[:, y])  # [M, B, M]
        pos = torch.cat([pos_cp.unsqueeze(-1), pos_up], -1) / tau  # [M, B, M+1]
        neg = torch.einsum("mbd,mcd->mbc", z, z) / tau  # [M, B, B]
        other = y[:, None] != y[None, :]  # [B, B]
        l_sam = _anchor_loss(pos, neg, other.expand_as(neg))  # [M, B]
        # mean within each (modality, class), summed over both.
        sam = (l_sam / count[y]).sum()

        # --- unimodal-prototype anchors: up[j, l] ---------------------------------
        pos = (up * cp).sum(-1, keepdim=True) / tau  # [M, K, 1]
        neg = torch.einsum("jkd,nld->jknl", up, up).flatten(2) / tau  # [M, K, M*K]
        other_cls = present[None, :] & ~torch.eye(num_classes, dtype=torch.bool, device=device)  # [K, K']
        neg_mask = other_cls[None, :, None, :].expand(M, -1, M, -1).flatten(2)
        l_up = _anchor_loss(pos, neg, neg_mask).mean(0)  # [K]
        up_loss = torch.where(present, l_up, torch.zeros_like(l_up)).sum()

        # --- crossmodal-prototype anchors: cp[l] ----------------------------------
        pos = torch.einsum("kd,jkd->kj", cp, up) / tau  # [K, M]
        neg = cp @ cp.T / tau  # [K, K]
        l_cp = _anchor_loss(pos, neg, other_cls)  # [K]
        cp_loss = torch.where(present, l_cp, torch.zeros_like(l_cp)).sum() / present.sum()

    return {"sam": sam, "up": up_loss, "cp": cp_loss}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(t: Tensor) -> Tensor:
    """All-gather ``t`` [b_r, ...] from every rank along dim 0, with gradient.

    Returns [sum_r b_r, ...] in rank order (local sizes may differ: rows are
    padded for the collective and trimmed again). The backward sums, on the
    owning rank, the gradients that every rank computed for its rows
    (``torch.distributed.nn.functional.all_gather`` semantics). Without an
    initialised process group (or world size 1) returns ``t`` unchanged.
    """
    world = _world()
    if world == 1:
        return t
    from torch.distributed.nn.functional import all_gather  # only under DDP (needs a distributed build of torch)

    sizes = _gather_sizes(t.shape[0], t.device)
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    parts = all_gather(t)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(_world())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _gather_nograd(t: Tensor) -> Tensor:
    sizes = _gather_sizes(t.shape[0], t.device)
    pad = max(sizes) - t.shape[0]
    if pad:
        t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))])
    parts = [torch.empty_like(t) for _ in sizes]
    dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def ccrm_losses_distributed(
    features: Sequence[Tensor], labels: Tensor, num_classes: int, tau: float = 0.07
) -> dict[str, Tensor]:
    """CCRM losses on the *global* batch (all ranks' rows, in rank order).

    Every rank gathers all features (with gradient) and labels, then calls
    :func:`ccrm_losses`, so all ranks get the same value, equal to the
    single-process loss on the concatenated batch. Falls back to
    ``ccrm_losses`` when torch.distributed is not initialised or world size 1.

    Gradient scaling under DDP (W = world size): because the all-gather
    backward *sums* the gradients that all W ranks compute for a rank's rows,
    and all W ranks compute the identical global loss, ``loss.backward()``
    leaves W x (single-process gradient) on each rank's local features. DDP's
    gradient *averaging* (division by W) cancels this exactly, so: add the
    CCRM terms to the loss unscaled (``L = CE_local + a*sam + b*up + c*cp``)
    and let DDP average; the resulting parameter gradients of the CCRM terms
    equal the single-process gradients on the concatenated batch. Equivalently,
    if gradients are summed across ranks instead of averaged, divide the
    CCRM terms by W. (The local CE mean is averaged by DDP into the global
    mean when local batch sizes are equal.)
    """
    if _world() == 1:
        return ccrm_losses(features, labels, num_classes, tau)
    # One collective for all modalities: [b, M, D] -> [B_global, M, D].
    stacked = gather_with_grad(torch.stack([f.float() for f in features], 1))
    all_labels = _gather_nograd(labels)
    return ccrm_losses(stacked.unbind(1), all_labels, num_classes, tau)
