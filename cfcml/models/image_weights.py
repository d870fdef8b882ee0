"""What `model.image_pretrained` names: the value grammar of the 2D backbone's weights.

Its own module so that the encoder that loads the weights (`cfcml.models.swin`) and the check
before training (`cfcml.models.pretrained`) share it without importing each other.
"""

from __future__ import annotations

from pathlib import Path

from ..util.errors import ConfigError

REQUIRED = "required"
RANDOM_INIT = "none"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
SWIN_CHECKPOINT_HELP = (
    "pass a local ImageNet checkpoint with --set model.image_pretrained=/path/to/swin_tiny_patch4_window7_224.pth "
    "(the file the authors used; a timm .safetensors/.pth of swin_tiny_patch4_window7_224 works too), or a timm "
    "hub name such as --set model.image_pretrained=swin_tiny_patch4_window7_224.ms_in1k (needs the model hub), "
    "or --set model.image_pretrained=none to train Swin-T from random weights on purpose"
)


def image_weights_kind(spec: str) -> str:
    """'required' | 'none' | 'file' | 'hub' for a `model.image_pretrained` value."""
    spec = str(spec).strip()
    if spec in (REQUIRED, RANDOM_INIT):
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return "file"
    if spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ConfigError(f"model.image_pretrained={spec!r}: no such checkpoint file; {SWIN_CHECKPOINT_HELP}")
    return "hub"
