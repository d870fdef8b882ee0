"""ReportInputs from finished runs: a run folder, a `cfcml cv` folder, or the best trial's
checkpointed runs of a study.

What each run wrote is read as is: `predictions.npz` (validation at the selected epoch, test
once; pooled over the runs), `metrics.json`, `config.yaml`, `best.pt`. The cohort (schema
from the run's config, data root from `summary.json["data"]` or the caller) gives the
attributes for the subgroups, and, with the trained weights, two model-side computations:

- missing modalities: the test metrics with each image series / photo and each attribute
  removed at inference, the registered model's way (`cfcml.platform.pyfunc.record_to_case`):
  the case's series becomes None (the datasets feed zeros; a missing reference series moves
  the resampling grid to the next one), the attribute's value None with the sentence of
  `MISSING_WORD` (MLP route: its columns zero). Preprocessing and prediction are the
  engine's own (`make_dataset`, `tabular_inputs`, `predict`), so the "none" row reproduces
  the saved test predictions.
- Grad-CAM: the most confident correct and wrong test cases (`select_cases`), the predicted
  class, at the deepest encoder stage whose grid is at least 2 cells wide (`cam_stage`),
  on every image encoder (MEN: one per series; Derm7pt: the shared one, once per photo).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import cohort_spec, config_from_dict
from ..datasets import SYNTHETIC_MARKER
from ..datasets.reader import load_cohort
from ..datasets.tabular import numeric_stats
from ..engine.decision import pooled_decision
from ..engine.inference import Env, predict
from ..engine.loaders import make_dataset, tabular_inputs
from ..engine.modality_dropout import MISSING_WORD
from ..engine.run_model import ready_model_from_run
from ..engine.splits import run_split
from ..models.encoders import image_encoder, uses_attribute_features
from ..util.redact import redact
from .build import build_report
from .explain import cam_stage, select_cases
from .gradcam import grad_cam
from .inputs import CohortInfo, Explanation, ReportInputs, SplitPredictions
from .stats import classification_metrics

log = logging.getLogger(__name__)

MISSING_METRICS = {
    2: ("auc", "acc", "balanced_acc"),
    3: ("auc", "acc", "balanced_acc", "macro_f1"),
}  # by class count (3 = 3+)
RUN_NAME = re.compile(r"(fold|seed)(-?\d+)")


class ReportError(ValueError):
    """The folder is not a finished run or cv folder, or its cohort cannot be found: bad input."""

    exit_code = 2


@dataclass
class RunFolder:
    """One finished run: name ("fold1", "seed0"), folder, metrics.json, resolved config."""

    name: str
    path: Path
    metrics: dict
    cfg: object  # cfcml.config.Config

    @property
    def selector(self) -> dict:
        """{"fold": K, "seed": None} or {"fold": None, "seed": S} (`run_split`'s arguments)."""
        kind, number = RUN_NAME.fullmatch(self.name).groups()
        return {"fold": None, "seed": None, kind: int(number)}


# ----------------------------------------------------------------------------- folders


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None


def read_run(path: str | Path) -> RunFolder:
    """A finished run folder (metrics.json marked finished, predictions.npz, best.pt, config.yaml)."""
    path = Path(path)
    for name in ("metrics.json", "predictions.npz", "best.pt", "config.yaml"):
        if not (path / name).is_file():
            raise ReportError(f"{path} is not a finished run: {name} is missing")
    metrics = _read_json(path / "metrics.json")
    if not metrics.get("finished"):
        raise ReportError(f"{path}: the run has not finished (metrics.json is not marked finished)")
    name = str(metrics.get("run", path.name))
    if not RUN_NAME.fullmatch(name):
        raise ReportError(f"{path}: unknown run name {name!r} (expected foldK or seedS)")
    cfg = config_from_dict(yaml.safe_load((path / "config.yaml").read_text()))
    return RunFolder(name, path, metrics, cfg)


def find_runs(path: str | Path) -> tuple[list[RunFolder], dict | None]:
    """(runs, summary.json or None) of a cv folder (every run its summary lists) or of one run."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path}: no such folder")
    if (path / "summary.json").is_file():
        summary = _read_json(path / "summary.json")
        names = [r["name"] for r in summary.get("runs", [])]
        if not names:
            raise ReportError(f"{path}/summary.json lists no runs")
        return [read_run(path / n) for n in names], summary
    if (path / "metrics.json").is_file():
        parent = path.parent / "summary.json"
        return [read_run(path)], _read_json(parent) if parent.is_file() else None
    raise ReportError(f"{path} is neither a run folder (metrics.json) nor a cv folder (summary.json)")


def runs_decision(runs: Sequence[RunFolder]):
    """The hard-label rule of the runs (`predict.decision`), with their training class counts
    (each run's metrics.json "decision") summed: one rule for the pooled predictions."""
    counts = [(r.metrics.get("decision") or {}).get("train_counts") for r in runs]
    try:
        return pooled_decision(runs[0].cfg.predict.decision, counts)
    except ValueError as e:
        raise ReportError(f"{runs[0].path}: {e}") from None


def pooled_predictions(runs: Sequence[RunFolder], split: str) -> SplitPredictions:
    """One split's saved predictions of every run, one row per (case, run)."""
    parts = {k: [] for k in ("case_ids", "labels", "probs", "logits", "features", "runs")}
    for r in runs:
        with np.load(r.path / "predictions.npz", allow_pickle=False) as saved:
            if f"{split}_case_ids" not in saved:
                raise ReportError(f"{r.path}/predictions.npz holds no {split} predictions")
            n = len(saved[f"{split}_case_ids"])
            for k in ("case_ids", "labels", "probs", "logits", "features"):
                parts[k].append(saved.get(f"{split}_{k}"))
            parts["runs"].append([r.name] * n)
    joined = {k: (None if any(v is None for v in vs) else np.concatenate(vs)) for k, vs in parts.items()}
    return SplitPredictions(**joined)


def data_root(runs: Sequence[RunFolder], summary: dict | None, data: str | Path | None) -> Path:
    if data is not None:
        return Path(data).expanduser()
    if summary and summary.get("data"):
        return Path(summary["data"])
    raise ReportError(
        f"{runs[0].path}: the cohort's data root is not recorded (a single run keeps none): pass --data DIR"
    )


def load_run_cohort(runs: Sequence[RunFolder], summary: dict | None, data: str | Path | None):
    """The cohort the runs were trained on; refused when its digest differs from theirs."""
    root = data_root(runs, summary, data)
    if not root.is_dir():
        raise ReportError(f"the cohort's data root {root} is not a folder: pass --data DIR")
    cohort = load_cohort(cohort_spec(runs[0].cfg), root)
    check_digest(runs, cohort)
    return cohort


def check_digest(runs: Sequence[RunFolder], cohort) -> None:
    digest = cohort.digest()
    for r in runs:
        trained = (r.metrics.get("identity") or {}).get("cohort_digest")
        if trained and trained != digest:
            raise ReportError(
                f"{r.path} was trained on other data than the cohort at {cohort.root} (cohort digest "
                f"{trained[:12]} there, {digest[:12]} here): pass the cohort it was trained on with --data"
            )


# ----------------------------------------------------------------------------- the model side


@dataclass
class LoadedRun:
    """A run's trained model with its split and tabular scaling, ready to predict."""

    folder: RunFolder
    split: object  # cfcml.engine.splits.RunSplit
    model: object  # torch module, eval mode
    numeric_stats: dict | None
    test_dataset: object = None
    test_tabular: object = None


def load_run_model(folder: RunFolder, cohort, device: str = "cpu") -> LoadedRun:
    cfg, spec = folder.cfg, cohort.spec
    split = run_split(cfg, cohort, **folder.selector)
    with np.load(folder.path / "predictions.npz", allow_pickle=False) as saved:
        if [str(c) for c in saved["test_case_ids"]] != [c.case_id for c in split.test]:
            raise ReportError(f"{folder.path}: the saved test cases are not this cohort's {folder.name} test part")
    mlp = uses_attribute_features(cfg)
    _, model = ready_model_from_run(folder.path, spec, device, cfg=cfg)
    stats = numeric_stats(spec, split.train) if mlp else None
    run = LoadedRun(folder, split, model, stats)
    run.test_dataset = make_dataset(cfg, spec, split.test, train=False)
    run.test_tabular = tabular_inputs(cfg, spec, split.test, stats)
    return run


def _env(device: str):
    return Env(torch.device(device), amp=False)


def _probs(run: LoadedRun, dataset, tabular, device: str) -> np.ndarray:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=run.folder.cfg.train.batch_size, shuffle=False, num_workers=0
    )
    return predict(run.model, loader, tabular, _env(device))["probs"]


def without_series(case, index: int):
    """The case with image series / photo `index` missing (as an empty pyfunc cell gives)."""
    images = list(case.images)
    images[index] = None
    return dataclasses.replace(case, images=tuple(images))


def without_attribute(case, spec, index: int):
    """The case with attribute `index` missing: value None, the "unknown" sentence, empty cell."""
    a = spec.attributes[index]
    sentences = list(case.sentences)
    sentences[index] = a.sentence_for(MISSING_WORD)
    return dataclasses.replace(
        case, attributes={**case.attributes, a.column: None}, sentences=tuple(sentences), raw={**case.raw, a.column: ""}
    )


def removals(spec, cfg) -> list[tuple[str, str, int]]:
    """(row name, "series" | "attribute", index) of every input the model reads."""
    word = spec.kind.word
    out = [(f"{word} {s}", "series", i) for i, s in enumerate(spec.series)] if cfg.model.use_images else []
    if cfg.model.use_tabular:
        out += [(f"attribute {a.column}", "attribute", i) for i, a in enumerate(spec.attributes)]
    return out


def missing_modality(loaded: Sequence[LoadedRun], cohort, device: str = "cpu") -> dict[str, dict[str, float]]:
    """{"none" | "series T1C" | "photo derm" | "attribute age" ...: {metric: value}} on the
    pooled test predictions of every run, one input removed at a time."""
    spec = cohort.spec
    classes, positive = list(spec.classes), spec.positive
    names = MISSING_METRICS[min(len(classes), 3)]
    decision = runs_decision([r.folder for r in loaded])
    labels = np.concatenate([[c.label for c in r.split.test] for r in loaded])
    cfg = loaded[0].folder.cfg
    rows = {"none": [_probs(r, r.test_dataset, r.test_tabular, device) for r in loaded]}
    inputs = len(spec.series) * cfg.model.use_images + len(spec.attributes) * cfg.model.use_tabular
    for row, kind, i in removals(spec, cfg):
        if inputs <= 1:
            break  # removing the only input leaves nothing to predict from
        probs = []
        for r in loaded:
            rcfg = r.folder.cfg
            if kind == "series":
                cases = [without_series(c, i) for c in r.split.test]
                probs.append(_probs(r, make_dataset(rcfg, spec, cases, train=False), r.test_tabular, device))
            else:
                cases = [without_attribute(c, spec, i) for c in r.split.test]
                probs.append(_probs(r, r.test_dataset, tabular_inputs(rcfg, spec, cases, r.numeric_stats), device))
        rows[row] = probs
    out = {}
    for row, probs in rows.items():
        m = classification_metrics(labels, np.concatenate(probs), classes, positive, decision=decision)
        out[row] = {k: float(m[k]) for k in names}
    return out


def explain_cases(
    loaded: Sequence[LoadedRun],
    test: SplitPredictions,
    cohort,
    n_correct: int = 2,
    n_wrong: int = 2,
    device: str = "cpu",
) -> list[Explanation]:
    """Grad-CAM of the predicted class (`predict.decision`) for the cases `select_cases` picks
    from the pooled test rows."""
    spec = cohort.spec
    cfg = loaded[0].folder.cfg
    if not cfg.model.use_images:
        return []
    by_run = {r.folder.name: r for r in loaded}
    size = tuple(cfg.data.image_size)
    stage = cam_stage(image_encoder(cfg).grids(list(size)))
    hard = runs_decision([r.folder for r in loaded]).labels(test.probs)
    out = []
    for row in select_cases(test.labels, test.probs, n_correct, n_wrong, pred=hard):
        run = by_run[test.runs[row]]
        index = [c.case_id for c in run.split.test].index(test.case_ids[row])
        item = run.test_dataset[index]
        images = [x[None].to(device) for x in item["images"]]
        tabular = None if run.test_tabular is None else run.test_tabular[index : index + 1].to(device)
        pred = int(hard[row])
        heatmaps, forward = [], functools.partial(run.model, images=images, tabular=tabular)
        for encoder in run.model.encoders:  # one per series, or one shared encoder called once per photo
            heatmaps += grad_cam(forward, encoder, pred, output_size=size, output_index=stage)
        if len(heatmaps) != len(spec.series):
            raise RuntimeError(f"Grad-CAM gave {len(heatmaps)} heatmaps for {len(spec.series)} image inputs")
        # one [C, *spatial] tensor per input: single-channel volumes as [D, H, W], photos as [3, H, W]
        pics = {
            s: (x[0, 0] if spec.kind.channels == 1 else x[0]).detach().cpu().numpy()
            for s, x in zip(spec.series, images)
        }
        heats = {s: h[0].cpu().numpy() for s, h in zip(spec.series, heatmaps)}
        out.append(
            Explanation(
                case_id=test.case_ids[row],
                true=int(test.labels[row]),
                pred=pred,
                correct=pred == int(test.labels[row]),
                kind=spec.image_kind,
                images=pics,
                heatmaps=heats,
            )
        )
    return out


# ----------------------------------------------------------------------------- assembling


def _method(cfg) -> str:
    if not cfg.model.use_images:
        return "CFCML (tabular only)"
    if not cfg.model.use_tabular:
        return "CFCML (images only)"
    return "CFCML"


def _split_description(runs: Sequence[RunFolder], spec, cfg) -> str:
    names = ", ".join(r.name for r in runs)
    if spec.split.kind == "folds":
        return (
            f"{len(runs)} cross-validation fold(s) ({names}): each patient tested once by the model that did not "
            f"train on it, test predictions pooled over the folds; validation (epoch selection, thresholds, "
            f"temperature): a stratified {cfg.data.val_fraction:.0%} of each run's training folds."
        )
    return (
        f"the cohort's fixed train/valid/test split, {len(runs)} seed(s) ({names}); the test predictions of "
        "every seed pooled (each test patient once per seed); validation: the cohort's valid part."
    )


def run_meta(runs: Sequence[RunFolder], cohort, extra: dict | None = None) -> dict:
    cfg, first = runs[0].cfg, runs[0].metrics
    identity = first.get("identity") or {}
    meta = {
        "method": _method(cfg),
        "preset": cfg.name,
        "config_digest": identity.get("config_digest"),
        "code_digest": identity.get("code_digest"),
        "data_digest": cohort.digest(),
        "selection_rule": (
            f"per run, the epoch with the best validation {first.get('select_metric', 'auc')} "
            f"(mean over the last {first.get('select_window', 1)} epoch(s)); test evaluated once"
        ),
        "split_description": _split_description(runs, cohort.spec, cfg),
        "date": datetime.date.today().isoformat(),
        "runs": [r.name for r in runs],
        "pretrained": first.get("pretrained"),
        "modality_dropout": cfg.train.modality_dropout,
        "synthetic": (Path(cohort.root) / SYNTHETIC_MARKER).exists() or None,  # written by `cfcml synth`
        "decision": runs_decision(runs).to_dict(),  # the hard-label rule every hard-label metric uses
    }
    limitations = []
    if cfg.train.modality_dropout > 0:
        limitations.append(
            f"Trained with modality dropout p = {cfg.train.modality_dropout:g} (inputs removed at "
            "random while training), which trades some accuracy with every input for robustness "
            "when one is missing."
        )
    meta["limitations"] = limitations
    meta |= extra or {}
    return {k: v for k, v in meta.items() if v is not None}


def inputs_from_runs(
    runs: Sequence[RunFolder],
    cohort,
    *,
    device: str = "cpu",
    missing: bool = True,
    explain: tuple[int, int] = (2, 2),
    meta: dict | None = None,
) -> ReportInputs:
    """ReportInputs from finished runs of one configuration and the cohort they trained on."""
    spec = cohort.spec
    splits = {"val": pooled_predictions(runs, "val"), "test": pooled_predictions(runs, "test")}
    wanted = {c for s in splits.values() for c in s.case_ids}
    attributes = {c.case_id: dict(c.attributes) for c in cohort.cases if c.case_id in wanted}
    loaded = [load_run_model(r, cohort, device) for r in runs] if (missing or any(explain)) else []
    mm = missing_modality(loaded, cohort, device) if missing else None
    explanations = explain_cases(loaded, splits["test"], cohort, *explain, device=device) if any(explain) else []
    info = CohortInfo(
        spec.name, list(spec.classes), spec.positive, [{"column": a.column, "type": a.type} for a in spec.attributes]
    )
    return ReportInputs(
        cohort=info,
        splits=splits,
        attributes=attributes,
        missing_modality=mm,
        explanations=explanations,
        meta=run_meta(runs, cohort, meta),
    )


def evidence_meta(summary: dict | None) -> dict:
    """From a cv folder's summary.json (`cfcml cv --baselines` / `--compare`): the single-modality
    models' pooled test AUCs as meta "baselines" and the answer to "do the images add to the
    table?" as meta "images_add" (both shown in the model card)."""
    paired = (summary or {}).get("paired") or {}
    out = {}
    single = {
        p["b"]: {"auc": p["auc_b"]} for p in paired.get("pairs", []) if p.get("kind_b") in ("attributes", "images")
    }
    if single:
        out["baselines"] = single
    if paired.get("images_add"):
        out["images_add"] = paired["images_add"]["sentence"]
    return out


def report_from_folder(
    path: str | Path,
    out_dir: str | Path,
    data: str | Path | None = None,
    *,
    device: str = "cpu",
    missing: bool = True,
    explain: tuple[int, int] = (2, 2),
    meta: dict | None = None,
    **options,
) -> dict:
    """`cfcml report`: a run or cv folder -> out_dir/report.{json,html} (+ model_card.md);
    returns the report dict. options go to `build_report` (n_bootstrap, seed, ...)."""
    runs, summary = find_runs(path)
    configs = {json.dumps(r.cfg.to_dict(), sort_keys=True) for r in runs}
    if len(configs) > 1:
        raise ReportError(f"{path}: the runs were trained with different configurations")
    cohort = load_run_cohort(runs, summary, data)
    paired = evidence_meta(summary) if (Path(path) / "summary.json").is_file() else {}  # the cv folder's, not a run's
    meta = {"run_dir": redact(str(Path(path).resolve())), **paired, **(meta or {})}
    inputs = inputs_from_runs(runs, cohort, device=device, missing=missing, explain=explain, meta=meta)
    return build_report(inputs, out_dir, **options)
