"""Swin-T as the authors had it: stage 4 = timm's forward_features (last stage + final norm)."""

import pytest
import timm
import torch

from cfcml.config import ConfigError
from cfcml.models.swin import SWIN_VARIANTS, TIMM_NAME, SwinEncoder2D


def _timm_swin(variant: str, size: int, seed: int = 3):
    """timm's own full Swin (random init) with a non-trivial final norm, so loading it matters."""
    torch.manual_seed(seed)
    full = timm.create_model(TIMM_NAME, img_size=size, **SWIN_VARIANTS[variant]).eval()
    with torch.no_grad():
        full.norm.weight.normal_()
        full.norm.bias.normal_()
    return full


@pytest.mark.parametrize("variant,size", [pytest.param("tiny", 224, marks=pytest.mark.slow), ("micro", 64)])
def test_stages_equal_timms_own_forward(tmp_path, variant, size):
    full = _timm_swin(variant, size)
    path = tmp_path / "swin.pth"
    torch.save(full.state_dict(), path)  # a full checkpoint: final norm and ImageNet head included
    ours = SwinEncoder2D(size, variant, pretrained=str(path)).eval()
    x = torch.randn(2, 3, size, size) if variant == "micro" else torch.randn(1, 3, size, size)
    with torch.no_grad():
        maps = ours(x)  # NCHW
        expected4 = full.forward_features(x)  # NHWC, after the final norm
        expected = full.forward_intermediates(x, intermediates_only=True)  # NCHW, no norm
    assert tuple(maps[3].shape) == (x.shape[0], expected4.shape[-1], *expected4.shape[1:3])
    torch.testing.assert_close(maps[3].permute(0, 2, 3, 1), expected4, rtol=1e-5, atol=1e-5)
    for ours_s, timm_s in zip(maps[:3], expected[:3]):
        torch.testing.assert_close(ours_s, timm_s, rtol=1e-5, atol=1e-5)
    # the norm is what separates stage 4 from the raw last stage
    assert (maps[3] - expected[3]).abs().max() > 1e-2


def test_final_norm_is_a_trained_part_of_the_backbone():
    enc = SwinEncoder2D(64, "micro")
    assert {"norm.weight", "norm.bias"} <= set(dict(enc.named_parameters()))
    assert enc.norm.normalized_shape == (128,)
    # Swin-T: timm's features-only body (27,517,818) + the final norm (2 x 768)
    tiny = SwinEncoder2D(224, "tiny")
    assert sum(p.numel() for p in tiny.parameters()) == 27_517_818 + 1536


def test_checkpoint_without_the_norm_or_of_another_architecture_is_refused(tmp_path):
    full = _timm_swin("micro", 64)
    no_norm = tmp_path / "no_norm.pth"
    torch.save({k: v for k, v in full.state_dict().items() if not k.startswith("norm.")}, no_norm)
    with pytest.raises(ValueError, match="lacks.*norm"):
        SwinEncoder2D(64, "micro", pretrained=str(no_norm))
    deeper = timm.create_model(TIMM_NAME, img_size=64, **{**SWIN_VARIANTS["micro"], "depths": (1, 1, 2, 1)})
    other = tmp_path / "deeper.pth"
    torch.save(deeper.state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):  # extra blocks are not silently dropped
        SwinEncoder2D(64, "micro", pretrained=str(other))


def test_hub_weights_load_the_norm_too(tmp_path, monkeypatch):
    """The hub path, offline: timm's own pretrained loader reads the file named in its config."""
    full = _timm_swin("micro", 64)
    path = tmp_path / "hub.pth"
    torch.save(full.state_dict(), path)
    real = timm.create_model

    def from_file(name, pretrained=False, **kw):
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(path), "num_classes": 1000}
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", from_file)
    enc = SwinEncoder2D(64, "micro", pretrained="swin_tiny_patch4_window7_224.ms_in1k")
    assert torch.equal(enc.norm.weight, full.norm.weight) and torch.equal(enc.norm.bias, full.norm.bias)
    assert torch.equal(enc.body.layers_3.blocks[0].mlp.fc1.weight, full.layers[3].blocks[0].mlp.fc1.weight)


def test_required_weights_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"model.image_pretrained=/path/to/swin_tiny_patch4_window7_224.pth"):
        SwinEncoder2D(64, "micro", pretrained="required")
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        SwinEncoder2D(64, "micro", pretrained="/nonexistent/swin.pth")
