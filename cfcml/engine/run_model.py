"""A run folder -> its model, ready to predict: the run's architecture with the weights of the
epoch selected on validation, in eval mode, on the device.

One definition for everything that reads a trained run back: `cfcml report` (the
missing-modality and Grad-CAM figures), the shipped package (`cfcml.platform.pyfunc`) and the
training run itself (which tests with the selected weights). A missing, corrupt or unsafe
checkpoint, or weights of another architecture, raise `CheckpointError` naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import yaml

from ..config import Config, config_from_dict
from ..datasets.spec import DatasetSpec
from ..datasets.tabular import num_features
from ..models.cfcml import build_model
from ..models.encoders import tabular_embedding
from ..models.pretrained import without_pretrained_weights
from .checkpoint import load_checkpoint, load_state_checked

BEST = "best.pt"  # in a run folder: {"model": the selected epoch's state dict, "epoch": ...}
CONFIG = "config.yaml"  # in a run folder: the resolved config


def run_architecture(cfg: Config, spec: DatasetSpec) -> torch.nn.Module:
    """The run's model, freshly initialised (pretrained encoders loaded as `cfg` says)."""
    n_tab = num_features(spec) if tabular_embedding(cfg).reads_features else None
    return build_model(cfg, spec.shape(), num_tabular_features=n_tab)


def selected_weights(path: str | Path, map_location="cpu") -> Mapping:
    """The state dict saved in a run's best.pt (CheckpointError naming the file otherwise)."""
    return load_checkpoint(path, map_location=map_location, required=("model",))["model"]


def ready_model(
    cfg: Config, spec: DatasetSpec, weights: Mapping, device="cpu", source: str | Path = "<weights>"
) -> torch.nn.Module:
    """The run's architecture holding `weights` (read from `source`, named in errors), in eval
    mode on `device`. No pretrained file is read: the weights hold every parameter."""
    model = run_architecture(without_pretrained_weights(cfg), spec)
    load_state_checked(model, weights, source)
    return model.to(torch.device(device)).eval()


def ready_model_from_run(
    run_dir: str | Path, spec: DatasetSpec, device="cpu", cfg: Config | None = None
) -> tuple[Config, torch.nn.Module]:
    """(config, ready model) of a finished run folder: its config.yaml (or `cfg` when the
    caller read it already) and the weights of its selected epoch (best.pt)."""
    run_dir = Path(run_dir)
    if cfg is None:
        cfg = config_from_dict(yaml.safe_load((run_dir / CONFIG).read_text()))
    best = run_dir / BEST
    return cfg, ready_model(cfg, spec, selected_weights(best, device), device, best)
