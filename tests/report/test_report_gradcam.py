"""Grad-CAM on tiny conv nets whose answer is known: channel 0 sees positive input, channel 1
negative input, and logit k is the spatial mean of channel k. So class 0's evidence is where
the input is positive, class 1's where it is negative."""

import pytest
import torch
from torch import nn

from cfcml.report.gradcam import grad_cam


class SignNet(nn.Module):
    """[B, 1, *grid] -> logits [B, 2]; `features` returns [B, 2, *grid / pool]."""

    def __init__(self, dims: int, pool: int = 1):
        super().__init__()
        conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, *([1] * dims)))
        pooling = (nn.AvgPool2d if dims == 2 else nn.AvgPool3d)(pool)
        self.features = nn.Sequential(conv, nn.ReLU(), pooling)
        self.head_relu = nn.ReLU(inplace=True)  # an in-place op right after the target layer

    def forward(self, x):
        f = self.head_relu(self.features(x))
        return f.flatten(2).mean(2)


def _two_blobs(dims: int) -> torch.Tensor:
    """Batch of 2: +1 in the first corner region, -1 in the opposite one, 0 elsewhere."""
    x = torch.zeros(2, 1, *([8] * dims))
    lo, hi = (slice(0, 4),) * dims, (slice(4, 8),) * dims
    x[(slice(None), 0, *lo)] = 1.0
    x[(slice(None), 0, *hi)] = -1.0
    return x, lo, hi


@pytest.mark.parametrize("dims,pool", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_heatmap_points_at_the_evidence_of_each_class(dims, pool):
    model = SignNet(dims, pool).eval()
    x, lo, hi = _two_blobs(dims)
    for cls, region, other in ((0, lo, hi), (1, hi, lo)):
        (heat,) = grad_cam(lambda: model(x), model.features, cls, output_size=x.shape[2:])
        assert heat.shape == (2, *x.shape[2:])
        assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
        inside = heat[(slice(None), *region)].mean()
        outside = heat[(slice(None), *other)].mean()
        assert inside > 0.8 and outside < 0.05, (cls, inside, outside)  # upsampling blurs the border


def test_per_sample_classes_and_grid_kept_without_output_size():
    model = SignNet(2, pool=2).eval()
    x, _lo, _hi = _two_blobs(2)
    (heat,) = grad_cam(lambda: model(x), model.features, torch.tensor([0, 1]))
    assert heat.shape == (2, 4, 4)  # the pooled grid
    assert heat[0, :2, :2].min() > 0.9 and heat[0, 2:, 2:].max() < 0.05  # sample 0 explains class 0
    assert heat[1, 2:, 2:].min() > 0.9 and heat[1, :2, :2].max() < 0.05  # sample 1 explains class 1


def test_leaves_no_state_frozen_model_and_outer_no_grad():
    model = SignNet(2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, lo, _ = _two_blobs(2)
    with torch.no_grad():
        (heat,) = grad_cam(lambda: {"logits": model(x)}, model.features, 0)
    assert heat[(slice(None), *lo)].mean() > 0.9
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.features._forward_hooks
    assert not heat.requires_grad


def test_hook_removed_when_the_model_raises():
    model = SignNet(2)

    def broken():
        model(torch.zeros(1, 1, 8, 8))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        grad_cam(broken, model.features, 0)
    assert not model.features._forward_hooks


def test_layer_not_called_is_an_error():
    model = SignNet(2)
    with pytest.raises(RuntimeError, match="not called"):
        grad_cam(lambda: torch.zeros(1, 2, requires_grad=True), model.features, 0)
    assert not model.features._forward_hooks


class SharedEncoderNet(nn.Module):
    """Two photos through one encoder that returns a list of stage maps (like our encoders);
    only photo "b" reaches the logits through the last stage."""

    def __init__(self):
        super().__init__()
        self.encoder = StageEncoder()

    def forward(self, a, b):
        stages_a, stages_b = self.encoder(a), self.encoder(b)
        return torch.stack([stages_b[1][:, 0].mean((1, 2)) + 0 * stages_a[1].sum(), stages_a[0].mean((1, 2, 3))], 1)


class StageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)

    def forward(self, x):
        s1 = torch.relu(self.conv(x))
        return [s1, nn.functional.avg_pool2d(s1, 2)]


def test_shared_encoder_gives_one_heatmap_per_call_and_output_index():
    model = SharedEncoderNet().eval()
    a = torch.zeros(1, 1, 8, 8)
    a[..., :4, :4] = 1.0
    b = torch.zeros(1, 1, 8, 8)
    b[..., 4:, 4:] = 1.0
    heat_a, heat_b = grad_cam(lambda: model(a, b), model.encoder, 0, output_size=(8, 8), output_index=1)
    assert heat_a.abs().max() == 0  # photo a does not drive class 0
    assert heat_b[0, 4:, 4:].mean() > 0.8 and heat_b[0, :4, :4].mean() < 0.05


def test_channels_last_maps():
    class NHWC(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = SignNet(2)

        def forward(self, x):
            return self.inner.features(x).permute(0, 2, 3, 1)

    model = NHWC()
    x, lo, hi = _two_blobs(2)
    (heat,) = grad_cam(lambda: model(x).mean((1, 2)), model, 1, channels_last=True)
    assert heat[(slice(None), *hi)].mean() > 0.9 and heat[(slice(None), *lo)].mean() < 0.05


@pytest.mark.parametrize("preset,kind", [("men-smoke", "volume"), ("derm7pt-smoke", "photo")])
def test_on_the_cfcml_model(preset, kind):
    """How the report calls it: the last stage of each image encoder of a (random-init) CFCML."""
    from cfcml.config import build_config
    from cfcml.models.cfcml import build_model, stage_grids
    from cfcml.models.shape import CohortShape
    from cfcml.models.summary import example_inputs
    from cfcml.report.explain import cam_stage

    torch.manual_seed(0)
    cfg = build_config(preset)
    shape = CohortShape(
        num_classes=3 if kind == "volume" else 2,
        num_images=3 if kind == "volume" else 2,
        num_attributes=6 if kind == "volume" else 5,
        image_kind=kind,
    )
    model = build_model(cfg, shape).eval()
    inputs = example_inputs(cfg, shape, batch=2)
    size = tuple(cfg.data.image_size)
    stage = cam_stage(stage_grids(cfg.model.image_encoder, list(size)))
    heatmaps = []
    for encoder in model.encoders:  # MEN: one per series; Derm7pt: one shared by both photos
        heatmaps += grad_cam(lambda: model(**inputs), encoder, 1, output_size=size, output_index=stage)
    assert len(heatmaps) == shape.num_images
    for h in heatmaps:
        assert h.shape == (2, *size) and torch.isfinite(h).all()
        assert h.min() >= 0 and h.max() <= 1 + 1e-6
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_select_cases_most_confident_correct_then_wrong():
    from cfcml.report.explain import select_cases

    labels = [0, 1, 0, 1, 0]
    probs = [[0.6, 0.4], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05], [0.9, 0.1]]
    # correct: rows 0 (.6), 1 (.9), 4 (.9); wrong: rows 2 (.8), 3 (.95)
    assert select_cases(labels, probs, n_correct=2, n_wrong=1) == [1, 4, 3]
    assert select_cases(labels, probs, n_correct=5, n_wrong=5) == [1, 4, 0, 3, 2]


def test_cam_stage_picks_the_deepest_usable_grid():
    from cfcml.models.cfcml import stage_grids
    from cfcml.report.explain import cam_stage

    assert cam_stage(stage_grids("nnmamba3d", [24, 128, 128])) == 3  # MEN: (2, 8, 8)
    assert cam_stage(stage_grids("nnmamba3d", [8, 16, 16])) == 1  # men-smoke: (2, 4, 4); (1, 2, 2) is flat
    assert cam_stage(stage_grids("swin_t", [224, 224])) == 3  # Derm7pt: 7 x 7
    assert cam_stage([(1, 1)]) == 0
