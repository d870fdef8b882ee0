"""The shipped model: an MLflow pyfunc that scores patients from image paths + attributes.

In: one row per patient (a pandas DataFrame), columns named by the cohort's schema —
``case_id``, one column per image series holding the file's path (volume cohorts also take
an optional ``mask``), and one column per attribute holding the table cell as written
(codes such as ``1`` for categorical attributes with `values`, words otherwise, numbers as
text). A series or attribute may be left empty: the model then runs without it (a blank
series, an "unknown" sentence) and says so in ``inputs_missing``.

Out: ``case_id``, one ``prob_<class>`` column per class (softmax probabilities averaged over
the packaged runs), ``pred`` (the class name), ``inputs_used`` / ``inputs_missing`` and
``status`` (``ok``, or why the row could not be scored: its probabilities are then NaN).

The model directory (the `package` artifact) holds plain data only: the resolved config,
the cohort schema, each packaged run's weights (tensors only, loaded with
``weights_only=True``), the sentence-embedding table and the numeric scaling of the MLP
embedding. The code is cfcml itself, shipped with the model and loaded through MLflow's
models-from-code (`cfcml/platform/mlflow_model.py`): nothing is unpickled. Preprocessing
and prediction are the very functions training uses (`cfcml.engine.loaders.make_dataset`,
`cfcml.engine.run.predict`).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

import cfcml
from cfcml.datasets.cohort import Case, Cohort
from cfcml.datasets.rows import parse_attribute
from cfcml.datasets.spec import DatasetSpec, remember
from cfcml.datasets.tabular import tabular_features
from cfcml.engine.loaders import make_dataset

from ..config import Config, config_from_dict, save_config
from ..engine.checkpoint import atomic_save, load_checkpoint
from ..engine.decision import decision_from_dict, pooled_decision, recorded_train_counts
from ..engine.inference import Env, predict
from ..engine.modality_dropout import MISSING_WORD  # what an empty attribute becomes in its sentence
from ..engine.run_model import ready_model
from ..models.encoders import tabular_embedding, uses_text_tower
from ..models.text import ClipTextEncoder, sentence_cache
from ..report.stats import apply_temperature

log = logging.getLogger(__name__)

PACKAGE_ARTIFACT = "package"
ALIAS = "challenger"
REQUIREMENTS = (
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "monai",
    "nibabel",
    "pillow",
    "pyyaml",
    "scikit-learn",
    "scipy",
    "timm",
    "open_clip_torch",
    "mlflow",
)


# ----------------------------------------------------------------------------- rows <-> cases


def input_columns(spec: DatasetSpec) -> list[str]:
    return ["case_id", *spec.series, *(["mask"] if spec.kind.has_mask else []), *spec.attribute_names]


def case_record(spec: DatasetSpec, case: Case) -> dict:
    """One input row for the pyfunc from a cohort case (the table cells as written)."""
    row = {"case_id": case.case_id}
    row |= {s: "" if p is None else str(p) for s, p in zip(spec.series, case.images)}
    if spec.kind.has_mask:
        row["mask"] = str(case.mask) if case.mask else ""
    row |= {a: str(case.raw.get(a, "")) for a in spec.attribute_names}
    return row


def cohort_frame(cohort: Cohort, cases: list[Case] | None = None):
    """The pyfunc input DataFrame for (some of) a cohort's cases."""
    rows = [case_record(cohort.spec, c) for c in (cohort.cases if cases is None else cases)]
    return pd.DataFrame(rows, columns=input_columns(cohort.spec))


def example_frame(spec: DatasetSpec):
    """A synthetic input example (no patient's data): made-up paths, the first word of each
    categorical attribute, the middle of each numeric range."""
    row = {"case_id": "example-1"}
    row |= {s: f"/path/to/example-1/{s}{spec.kind.suffix}" for s in spec.series}
    if spec.kind.has_mask:
        row["mask"] = ""
    for a in spec.attributes:
        if a.type == "categorical":
            row[a.column] = next(iter(a.values)) if a.values is not None else a.vocabulary[0]
        else:
            lo, hi = a.min if a.min is not None else 0.0, a.max if a.max is not None else 100.0
            row[a.column] = f"{(lo + hi) / 2:g}"
    return pd.DataFrame([row], columns=input_columns(spec))


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def record_to_case(spec: DatasetSpec, row: dict) -> tuple[Case, list[str]]:
    """A pyfunc input row -> (a Case with label -1 that the training datasets preprocess, the
    names of the inputs left empty). Bad values raise ValueError naming the column."""
    cid = "" if _blank(row.get("case_id")) else str(row["case_id"]).strip()
    if not cid:
        raise ValueError("missing case_id")
    missing = [s for s in spec.series if _blank(row.get(s))]
    if len(missing) == len(spec.series) and all(_blank(row.get(a)) for a in spec.attribute_names):
        raise ValueError("no input at all: every image and attribute is empty")
    images = tuple(None if s in missing else Path(str(row[s]).strip()) for s in spec.series)
    for s, p in zip(spec.series, images):
        if p is not None and not p.is_file():
            raise ValueError(f"{s}: image file {p} does not exist")
    values, raw, shown = {}, {}, []
    for a in spec.attributes:
        text = "" if _blank(row.get(a.column)) else str(row[a.column]).strip()
        raw[a.column] = text
        if not text:
            missing.append(a.column)
            values[a.column], word = None, MISSING_WORD
        else:
            values[a.column], word, why = parse_attribute(a, text)
            if why:
                raise ValueError(f"{a.column}: {why}")
        shown.append(word)
    sentences = tuple(a.sentence_for(w) for a, w in zip(spec.attributes, shown))
    mask = None if not spec.kind.has_mask or _blank(row.get("mask")) else Path(str(row["mask"]).strip())
    return Case(
        case_id=cid,
        label=-1,
        split="predict",
        images=images,
        attributes=values,
        sentences=sentences,
        mask=mask,
        raw=raw,
    ), missing


def model_signature(spec: DatasetSpec):
    # only the id is required: a patient may lack a series or an attribute
    inputs = [ColSpec("string", c, required=c == "case_id") for c in input_columns(spec)]
    outputs = [
        ColSpec("string", "case_id"),
        *[ColSpec("double", f"prob_{c}") for c in spec.classes],
        ColSpec("string", "pred"),
        ColSpec("string", "inputs_used"),
        ColSpec("string", "inputs_missing"),
        ColSpec("string", "status"),
    ]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


# ----------------------------------------------------------------------------- the package


def sentence_table(cfg: Config, cases: list[Case], spec: DatasetSpec) -> tuple[list[str], np.ndarray]:
    """Every distinct sentence of `cases` (and each attribute's "unknown" sentence) with its
    frozen text-encoder embedding, through the on-disk cache (the vectors training used)."""
    sentences = sorted(
        {s for c in cases for s in c.sentences} | {a.sentence_for(MISSING_WORD) for a in spec.attributes}
    )
    cache = sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained)
    return sentences, cache.embed(sentences).float().numpy()


def build_package(
    cfg: Config, runs: list[dict], cohort: Cohort, out_dir: str | Path, extra_meta: dict | None = None
) -> Path:
    """Write the model directory (plain data only).

    `runs`: ``[{"name": "fold1", "weights": Path to best.pt, "numeric_stats": {...} or None}, ...]``
    (``numeric_stats``: the MLP embedding's scaling, fitted on that run's training part).
    """
    out = Path(out_dir)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    (out / "cohort.json").write_text(json.dumps({"source": cohort.spec.source, "raw": cohort.spec.to_dict()}, indent=2))
    meta_runs = []
    for r in runs:
        state = load_checkpoint(r["weights"], required=("model",))
        atomic_save({k: v.contiguous() for k, v in state["model"].items()}, out / "weights" / f"{r['name']}.pt")
        meta_runs.append(
            {
                "name": r["name"],
                "selected_epoch": None if state.get("epoch") is None else int(state["epoch"]) + 1,
                "numeric_stats": r.get("numeric_stats"),
                "train_counts": r.get("train_counts") or recorded_train_counts(Path(r["weights"]).parent),
            }
        )
    if uses_text_tower(cfg):
        sentences, emb = sentence_table(cfg, cohort.cases, cohort.spec)
        np.savez(out / "sentences.npz", sentences=np.array(sentences, dtype=str), embeddings=emb)
    meta = {
        "dataset": cohort.spec.name,
        "classes": list(cohort.spec.classes),
        "columns": input_columns(cohort.spec),
        "runs": meta_runs,
        **(extra_meta or {}),
        # predict.decision: the hard-label rule, with the packaged runs' training class counts summed
        "decision": pooled_decision(cfg.predict.decision, [m["train_counts"] for m in meta_runs]).to_dict(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


class PackagedModel:
    """A model directory loaded for prediction (plain Python; the MLflow wrapper delegates here)."""

    def __init__(self, package: str | Path, device: str | None = None):
        package = Path(package)
        self.meta = json.loads((package / "meta.json").read_text())
        shipped = json.loads((package / "cohort.json").read_text())
        self.spec = remember(shipped)  # the packaged schema, also where its file does not exist
        self.cfg = config_from_dict(yaml.safe_load((package / "config.yaml").read_text()))
        self.cfg.data.num_workers = 0
        self.env = Env(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), amp=False)
        # report.temperature: the temperature fitted on the validation logits of the packaged runs
        self.temperature = self.meta.get("temperature")
        self.decision = decision_from_dict(self.meta.get("decision"))  # `pred`: argmax, or prior-adjusted argmax
        self.table = None
        if (package / "sentences.npz").exists():
            with np.load(package / "sentences.npz", allow_pickle=False) as t:
                self.table = {str(s): torch.from_numpy(e.copy()) for s, e in zip(t["sentences"], t["embeddings"])}
        self._encoder = None
        self.models = []
        for r in self.meta["runs"]:
            path = package / "weights" / f"{r['name']}.pt"  # the selected weights alone (no optimizer, no RNG)
            weights = torch.load(path, map_location="cpu", weights_only=True)
            self.models.append(ready_model(self.cfg, self.spec, weights, self.env.device, path))

    def _embed(self, sentences: list[str]) -> torch.Tensor:
        unseen = sorted({s for s in sentences if s not in self.table})
        if unseen:
            if self._encoder is None:
                log.info("%d sentence(s) not in the packaged table: building the text encoder", len(unseen))
                self._encoder = ClipTextEncoder(self.cfg.model.text_pretrained)
            for s, e in zip(unseen, self._encoder.encode(unseen)):
                self.table[s] = e
        return torch.stack([self.table[s] for s in sentences])

    def _tabular(self, cases: list[Case], run: dict) -> torch.Tensor | None:
        if not self.cfg.model.use_tabular:
            return None
        if tabular_embedding(self.cfg).reads_features:
            stats = {k: tuple(v) for k, v in (run.get("numeric_stats") or {}).items()}
            return torch.from_numpy(tabular_features(self.spec, cases, stats=stats))
        flat = [s for c in cases for s in c.sentences]
        return self._embed(flat).view(len(cases), len(self.spec.attributes), -1)

    def predict_cases(self, cases: list[Case]) -> np.ndarray:
        """[N, K] class probabilities, averaged over the packaged runs; with a packaged
        temperature T each run's probabilities are softmax(logits / T) (T fitted on validation)."""
        if not cases:
            return np.zeros((0, self.spec.num_classes), dtype=np.float32)
        dataset = make_dataset(self.cfg, self.spec, cases, train=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False, num_workers=0)
        probs = []
        for m, r in zip(self.models, self.meta["runs"]):
            out = predict(m, loader, self._tabular(cases, r), self.env, keep=self.temperature is not None)
            probs.append(
                out["probs"] if self.temperature is None else apply_temperature(out["logits"], self.temperature)
            )
        return np.mean(probs, axis=0)

    def predict_frame(self, frame):
        """The output DataFrame for an input DataFrame (one row each, in order)."""
        rows = frame.to_dict("records")
        cases, status, missing = [], [], []
        for row in rows:
            try:
                case, gone = record_to_case(self.spec, row)
                cases.append(case)
                status.append("ok")
                missing.append(gone)
            except ValueError as e:
                cases.append(None)
                status.append(f"not scored: {e}")
                missing.append([])
        good = [c for c in cases if c is not None]
        try:
            probs = self.predict_cases(good)
        except (OSError, ValueError, RuntimeError) as e:  # unreadable image files: say so per row
            probs = np.full((len(good), self.spec.num_classes), np.nan)
            status = [s if c is None else f"not scored: {e}" for s, c in zip(status, cases)]
        full = np.full((len(rows), self.spec.num_classes), np.nan)
        full[[i for i, c in enumerate(cases) if c is not None]] = probs
        names = [*self.spec.series, *self.spec.attribute_names]
        out = pd.DataFrame({"case_id": [str(r.get("case_id", "")) for r in rows]})
        for k, name in enumerate(self.spec.classes):
            out[f"prob_{name}"] = full[:, k].astype(float)
        hard = self.decision.labels(np.nan_to_num(full))
        out["pred"] = ["" if np.isnan(p).any() else self.spec.classes[int(k)] for p, k in zip(full, hard)]
        out["inputs_used"] = [
            ",".join(n for n in names if n not in m) if s == "ok" else "" for s, m in zip(status, missing)
        ]
        out["inputs_missing"] = [",".join(m) for m in missing]
        out["status"] = status
        return out


# MLflow nags about type hints on predict (for its own input validation); the signature
# already describes and enforces the input, so silence it at class creation.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Tt]ype hint.*")
    import mlflow.pyfunc

    class CfcmlModel(mlflow.pyfunc.PythonModel):
        """The MLflow face of `PackagedModel` (set by models-from-code, never pickled)."""

        _skip_type_hint_validation = True  # the signature describes and enforces the input

        def load_context(self, context) -> None:
            self.model = PackagedModel(context.artifacts[PACKAGE_ARTIFACT])

        def predict(self, context, model_input, params=None):
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            return self.model.predict_frame(frame)


# ----------------------------------------------------------------------------- provenance


def package_versions() -> dict[str, str]:
    names = ("cfcml", "torch", "ray", "mlflow", "optuna", "numpy", "monai", "timm", "open_clip_torch")
    out = {}
    for n in names:
        try:
            out[n] = importlib_metadata.version(n)
        except importlib_metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def git_commit(default: str = "unknown") -> str:
    """The commit of the checkout the code runs from (jobs pass it explicitly: a Ray job's
    working directory has no .git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or default
    except (OSError, subprocess.SubprocessError):
        return default


def _requirements() -> list[str]:
    reqs = []
    for n in REQUIREMENTS:
        try:
            reqs.append(f"{n}=={importlib_metadata.version(n)}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(n)
    return reqs


# ----------------------------------------------------------------------------- logging


def log_model(
    package_dir: str | Path,
    spec: DatasetSpec,
    registered_model_name: str | None = None,
    metadata: dict | None = None,
    name: str = "model",
):
    """Log the package as a pyfunc in the active run, the MLflow way that pickles nothing
    (models from code), with its signature and a synthetic input example; register it when
    `registered_model_name` is given. Returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name, registered_model_name=registered_model_name, **_model_arguments(package_dir, spec, metadata)
    )


def save_model(package_dir: str | Path, spec: DatasetSpec, path: str | Path, metadata: dict | None = None) -> Path:
    """The same MLflow model as `log_model` logs, saved to a local folder (what the study loads
    with `cfcml predict`'s loader to measure the package before it is logged)."""
    mlflow.pyfunc.save_model(path=str(path), **_model_arguments(package_dir, spec, metadata))
    return Path(path)


def _model_arguments(package_dir: str | Path, spec: DatasetSpec, metadata: dict | None) -> dict:
    return {
        "python_model": str(Path(__file__).with_name("mlflow_model.py")),
        "artifacts": {PACKAGE_ARTIFACT: str(package_dir)},
        "code_paths": [str(Path(cfcml.__file__).resolve().parent)],
        "signature": model_signature(spec),
        "input_example": example_frame(spec),
        "pip_requirements": _requirements(),
        "metadata": {"dataset": spec.name, **(metadata or {})},
    }


def tag_version(client, name: str, version: str, tags: dict, alias: str | None = ALIAS) -> None:
    """Tags (stringified) on a registered version, then point `alias` at it."""
    for key, value in tags.items():
        text = (
            value
            if isinstance(value, str)
            else json.dumps(value, default=str)
            if isinstance(value, (dict, list))
            else repr(value)
        )
        client.set_model_version_tag(name, str(version), key, text[:5000])
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
