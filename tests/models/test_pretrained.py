"""Paper presets refuse random-init image encoders unless asked; what was used is recorded."""

import hashlib
import json

import pytest
import torch

from cfcml.cli import main
from cfcml.config import ConfigError, build_config
from cfcml.models.pretrained import check_pretrained, pretrained_provenance, without_pretrained_weights


def test_paper_preset_without_image_weights_is_refused_with_the_way_out():
    cfg = build_config("derm7pt")
    assert cfg.model.image_pretrained == "required"
    with pytest.raises(ConfigError) as e:
        check_pretrained(cfg)
    message = str(e.value)
    assert "model.image_pretrained" in message
    assert "--set model.image_pretrained=/path/to/swin_tiny_patch4_window7_224.pth" in message
    assert "--set model.image_pretrained=none" in message
    with pytest.raises(ConfigError, match="model.image_pretrained=/path/to"):
        pretrained_provenance(cfg)  # nothing to record until the user chose


def test_explicit_choices_pass(tmp_path):
    ckpt = tmp_path / "swin_tiny_patch4_window7_224.pth"
    ckpt.write_bytes(b"weights")
    for value in [
        "none",
        str(ckpt),
        "swin_tiny_patch4_window7_224.ms_in1k",
        "hf-hub:timm/swin_tiny_patch4_window7_224.ms_in1k",
    ]:
        check_pretrained(build_config("derm7pt", [f"model.image_pretrained={value}"]))
    check_pretrained(build_config("men"))  # the 3D encoder has no pretrained weights to ask for
    check_pretrained(build_config("derm7pt", ["model.use_images=false"]))


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.image_pretrained=/no/such/swin.pth", "no such checkpoint file"),
        ("model.image_pretrained=timm/swin_tiny_patch4_window7_224.ms_in1k", "hf-hub:"),  # timm wants the prefix
        ("model.text_pretrained=bogus:/x.pt", "not an open_clip pretrained tag"),
        ("model.text_pretrained=openai:/no/such/clip.pt", "no such file"),
    ],
)
def test_unusable_weights_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        check_pretrained(build_config("derm7pt-smoke", [override]))


def test_summary_of_a_paper_preset_is_not_refused():
    cfg = build_config("derm7pt")
    assert without_pretrained_weights(cfg).model.image_pretrained == "none"
    assert cfg.model.image_pretrained == "required"  # a copy: the original is untouched


def test_cli_summary_works_on_the_paper_preset(capsys):
    assert main(["summary", "--preset", "derm7pt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 29_660_484 + 1536


def test_provenance(tmp_path):
    swin = tmp_path / "swin.pth"
    swin.write_bytes(b"swin weights")
    from cfcml.models.text import ClipTextEncoder

    clip = tmp_path / "clip.pt"
    torch.save(ClipTextEncoder("none").tower.state_dict(), clip)
    clip_sha = hashlib.sha256(clip.read_bytes()).hexdigest()

    assert pretrained_provenance(build_config("derm7pt-smoke")) == {"image": "none", "text": "none"}
    got = pretrained_provenance(
        build_config(
            "derm7pt-smoke", [f"model.image_pretrained={swin}", f"model.text_pretrained=laion2b_s34b_b79k:{clip}"]
        )
    )
    assert got == {
        "image": f"sha256:{hashlib.sha256(b'swin weights').hexdigest()}",
        "text": f"laion2b_s34b_b79k:sha256:{clip_sha}",
    }
    got = pretrained_provenance(
        build_config(
            "derm7pt-smoke",
            ["model.image_pretrained=swin_tiny_patch4_window7_224.ms_in1k", f"model.text_pretrained={clip}"],
        )
    )
    assert got == {"image": "hub:swin_tiny_patch4_window7_224.ms_in1k", "text": f"openai:sha256:{clip_sha}"}
    assert pretrained_provenance(build_config("men-smoke", ["model.tabular_embedding=mlp"])) == {
        "image": "none",
        "text": "unused",
    }
    assert pretrained_provenance(build_config("men-smoke", ["model.use_images=false"]))["image"] == "unused"


def test_train_on_a_paper_preset_without_weights_exits_2_and_random_init_on_purpose_is_recorded(tmp_path, capsys):
    """The acceptance path at the CLI: `cfcml train --preset derm7pt` refuses (exit 2, naming the
    key and the way out) before anything is written; `image_pretrained=none` runs and says so."""
    import json

    from cfcml.cli import main
    from cfcml.datasets import write_synthetic

    data = write_synthetic("derm7pt", tmp_path / "release_v0", 40, seed=1)
    base = [
        "train",
        "--preset",
        "derm7pt",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--set",
        "train.select_min_epoch=0",
        "--set",
        "data.image_size=[32,32]",
        "--set",
        "model.swin_variant=micro",
        "--set",
        "train.batch_size=8",
        "--set",
        "model.text_pretrained=none",
        "--set",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "model.image_pretrained" in err and "--set model.image_pretrained=none" in err
    assert not (tmp_path / "run").exists()
    assert main([*base, "--set", "model.image_pretrained=none"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["pretrained"] == {"image": "none", "text": "none"}
    assert "auprc_label" in metrics["test"]
