import io

import pytest
import torch

from cfcml.config import build_config
from cfcml.datasets.spec import load_spec
from cfcml.models.cfcml import build_model, count_params
from cfcml.models.summary import example_inputs


def _forward(cfg, batch=2, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg, load_spec(cfg.dataset).shape(), num_tabular_features=16)
    return model, model(**example_inputs(cfg, load_spec(cfg.dataset).shape(), batch=batch))


@pytest.mark.slow
def test_men_paper_preset_shapes_and_size():
    cfg = build_config("men")
    model, out = _forward(cfg, batch=1)
    assert out["logits"].shape == (1, 3)
    assert [tuple(f.shape) for f in out["features"]] == [(1, 128)] * 4
    assert abs(count_params(model) / 35.98e6 - 1) < 0.02


def test_derm7pt_paper_preset_shapes_and_size():
    cfg = build_config("derm7pt", ["model.image_pretrained=none"])  # the preset itself requires ImageNet weights
    model, out = _forward(cfg, batch=1)
    assert out["logits"].shape == (1, 2)
    assert [tuple(f.shape) for f in out["features"]] == [(1, 128)] * 3
    assert abs(count_params(model) / 29.66e6 - 1) < 0.02
    # Swin-T: timm's four stages (27,517,818) and the final norm (2 x 768), 27.52 M of it
    assert sum(p.numel() for p in model.encoders[0].parameters()) == 27_517_818 + 1536


@pytest.mark.parametrize("preset", ["men-smoke", "derm7pt-smoke"])
def test_gradient_reaches_every_trainable_parameter(preset):
    # 8x32x32 volumes: at the smoke preset's 8x16x16 the last stage is a single voxel, a
    # length-1 sequence that leaves the Mamba conv's earlier taps without gradient.
    cfg = build_config(preset, ["data.image_size=[8,32,32]"] if preset == "men-smoke" else [])
    model, out = _forward(cfg, batch=4)
    labels = torch.tensor([0, 1, 0, 1])
    model.loss_terms(out, labels, epoch=0)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_text_encoder_is_not_part_of_the_model():
    cfg = build_config("men-smoke")
    model = build_model(cfg, load_spec(cfg.dataset).shape())
    keys = model.state_dict().keys()
    assert not any(k.startswith(("token_embedding", "transformer.resblocks", "ln_final")) for k in keys)
    assert not any("text_projection" in k for k in keys)
    # only the trainable 512->C_t projection of the sentence embeddings is in the model
    assert model.tabular_embed.proj.in_features == 512


@pytest.mark.parametrize(
    "overrides, n_features",
    [
        (["model.mg_cie=false", "model.sg_stage=4"], 4),
        (["model.mg_cie=false", "model.sg_stage=2"], 4),
        (["model.tabular_embedding=mlp"], 4),
        (["model.token_mapping=perceiver"], 4),
        (["model.use_tabular=false"], 3),
        (["model.use_images=false"], 1),
        (["loss.ccrm=false"], 4),
    ],
)
def test_ablation_switches_build_and_run(overrides, n_features):
    cfg = build_config("men-smoke", overrides)
    model, out = _forward(cfg)
    assert out["logits"].shape == (2, 3)
    assert len(out["features"]) == n_features
    if cfg.model.use_images and not cfg.model.mg_cie:
        assert len(model.image_token_maps[0]) == 1  # SG-CIE: one granularity only


def test_swin_detach_early_stages_trains_the_backbone_through_stage_four_only():
    from cfcml.models.swin import SwinEncoder2D

    x = torch.randn(1, 3, 64, 64)
    detached = SwinEncoder2D(64, "micro", detach_early_stages=True)(x)
    assert [f.requires_grad for f in detached] == [False, False, False, True]
    full = SwinEncoder2D(64, "micro")(x)
    assert all(f.requires_grad for f in full)
    assert [f.shape[1] for f in full] == [16, 32, 64, 128]  # NCHW


def test_wrong_input_grid_is_a_clear_error():
    cfg = build_config("men-smoke")
    model = build_model(cfg, load_spec(cfg.dataset).shape())
    inputs = example_inputs(cfg, load_spec(cfg.dataset).shape())
    inputs["images"] = [torch.randn(2, 1, 8, 32, 32) for _ in range(3)]
    with pytest.raises(ValueError, match="differs from data.image_size"):
        model(**inputs)


def test_checkpoint_round_trip_gives_identical_outputs():
    cfg = build_config("derm7pt-smoke")
    model, _ = _forward(cfg)
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    torch.manual_seed(123)  # a different init
    other = build_model(cfg, load_spec(cfg.dataset).shape()).eval()
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = example_inputs(cfg, load_spec(cfg.dataset).shape())
    with torch.no_grad():
        assert torch.equal(model(**x)["logits"], other(**x)["logits"])


def test_swin_loads_a_local_imagenet_checkpoint(tmp_path):
    """A full timm Swin checkpoint (with its ImageNet head) loads into the feature extractor."""
    import timm

    from cfcml.models.swin import SWIN_VARIANTS, TIMM_NAME, SwinEncoder2D

    torch.manual_seed(7)
    full = timm.create_model(TIMM_NAME, img_size=64, **SWIN_VARIANTS["micro"])
    path = tmp_path / "swin.pth"
    torch.save(full.state_dict(), path)
    enc = SwinEncoder2D(64, "micro", pretrained=str(path))
    got = dict(enc.body.named_parameters())
    assert torch.equal(got["layers_3.blocks.0.mlp.fc1.weight"], full.state_dict()["layers.3.blocks.0.mlp.fc1.weight"])
    assert torch.equal(got["patch_embed.proj.weight"], full.state_dict()["patch_embed.proj.weight"])


def test_mamba_state_size_reaches_every_nnmamba_layer():
    model = build_model(
        build_config("men-smoke", ["model.mamba_d_state=4"]), load_spec("men").shape(), num_tabular_features=10
    )
    a_logs = [p for name, p in model.named_parameters() if name.endswith("A_log")]
    assert a_logs and all(p.shape[1] == 4 for p in a_logs)
