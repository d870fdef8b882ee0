"""The shipped model: an MLflow pyfunc that scores patients from image paths + attributes.

In: one row per patient (a pandas DataFrame) —

- MEN: ``case_id``, ``T1C``, ``FLAIR_C``, ``ADC`` (NIfTI paths), optional ``mask`` (ROI path or
  empty), and the clinical attributes ``location, sex, age, adc_value, tumor_area,
  edema_area`` as the text of the clinical.csv cells (location 1/2/3, sex 0/1);
- Derm7pt: ``case_id``, ``clinic``, ``derm`` (image paths) and
  ``level_of_diagnostic_difficulty, elevation, location, sex, management`` (meta.csv words).

Out: ``case_id``, one ``prob_<class>`` column per class (softmax probabilities, averaged over
the packaged models) and ``pred`` (the class name).

The model directory holds everything the prediction needs besides the image files:
the resolved config, the class names, the weights of each run of the best trial (one per
MEN fold / Derm7pt seed, each at its epoch selected on validation; their probabilities are
averaged), the preprocessing (the same deterministic MONAI / PIL pipelines as training, run
by the datasets of :mod:`cfcml.datasets`), the sentence-embedding table (sentence -> frozen
text-encoder vector) of every sentence seen in the cohort, and the ``cfcml`` code itself.
A sentence that is not in the table (an unseen age or area value) is encoded with the text
encoder the config names (``model.text_pretrained``); with ``openai`` weights this needs
them in the local Hugging Face cache or a local file (see docs/platform.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import subprocess
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from types import SimpleNamespace

import mlflow.pyfunc
import numpy as np
import torch

from cfcml.datasets.cohort import Case, Cohort
from cfcml.datasets.registry import cohort_classes, cohort_series, cohort_shape

from ..config import Config, config_from_dict, save_config

log = logging.getLogger(__name__)

PACKAGE_ARTIFACT = "package"
ALIAS = "challenger"
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "monai", "nibabel", "pillow", "pyyaml", "scikit-learn",
                "scipy", "timm", "open_clip_torch", "mlflow")  # fmt: skip


# ----------------------------------------------------------------------------- rows <-> cases


def _dataset_module(dataset: str):
    if dataset == "men":
        from cfcml.datasets.men import reader as men

        return men
    from cfcml.datasets.derm7pt import reader as derm7pt

    return derm7pt


def attribute_names(dataset: str) -> tuple[str, ...]:
    return _dataset_module(dataset).ATTRIBUTES


def image_columns(dataset: str) -> tuple[str, ...]:
    return cohort_series(dataset)


def _men_raw_text(case: Case) -> dict[str, str]:
    """The clinical.csv cell texts behind a case's sentences (sentences insert them verbatim)."""
    from cfcml.datasets.men.reader import ATTRIBUTES, TEMPLATES

    raw = {}
    for attr, sentence in zip(ATTRIBUTES, case.sentences):
        if attr in ("location", "sex"):
            raw[attr] = str(int(case.attributes[attr]))
            continue
        prefix = TEMPLATES[attr].split("{v}")[0]
        raw[attr] = sentence[len(prefix) :] if sentence.startswith(prefix) else f"{case.attributes[attr]:g}"
    return raw


def case_record(dataset: str, case: Case) -> dict:
    """One input row for the pyfunc from a cohort case."""
    row = {"case_id": case.case_id}
    row |= {m: str(p) for m, p in zip(image_columns(dataset), case.images)}
    if dataset == "men":
        row["mask"] = str(case.mask) if case.mask else ""
        row |= _men_raw_text(case)
    else:
        row |= {a: str(case.attributes[a]) for a in attribute_names(dataset)}
    return row


def cohort_frame(cohort: Cohort, cases: list[Case] | None = None):
    """The pyfunc input DataFrame for (some of) a cohort's cases."""
    import pandas as pd

    rows = [case_record(cohort.dataset, c) for c in (cohort.cases if cases is None else cases)]
    return pd.DataFrame(rows)


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def record_to_case(dataset: str, row: dict) -> Case:
    """A pyfunc input row -> a Case (label -1) the training datasets can preprocess."""
    missing = [c for c in ("case_id", *image_columns(dataset), *attribute_names(dataset)) if c not in row or _blank(row[c])]
    if missing:
        raise ValueError(f"row {row.get('case_id', '?')}: missing column(s) or value(s) {missing}")
    images = tuple(Path(str(row[m])) for m in image_columns(dataset))
    if dataset == "men":
        from cfcml.datasets.men.reader import ATTRIBUTES, men_sentences

        raw = {a: str(row[a]).strip() for a in ATTRIBUTES}
        attrs = {a: (int(float(v)) if a in ("location", "sex") else float(v)) for a, v in raw.items()}
        mask = None if _blank(row.get("mask")) else Path(str(row["mask"]))
        return Case(str(row["case_id"]), -1, "predict", images, attrs, men_sentences(raw), mask)
    from cfcml.datasets.derm7pt.reader import ATTRIBUTES, derm7pt_sentences

    attrs = {a: str(row[a]).strip() for a in ATTRIBUTES}
    return Case(str(row["case_id"]), -1, "predict", images, attrs, derm7pt_sentences(attrs))


# ----------------------------------------------------------------------------- signature


def model_signature(dataset: str):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = [ColSpec("string", "case_id")] + [ColSpec("string", m) for m in image_columns(dataset)]
    if dataset == "men":
        inputs.append(ColSpec("string", "mask", required=False))
    inputs += [ColSpec("string", a) for a in attribute_names(dataset)]
    outputs = [ColSpec("string", "case_id")] + [ColSpec("double", f"prob_{c}") for c in cohort_classes(dataset)]
    outputs.append(ColSpec("string", "pred"))
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


# ----------------------------------------------------------------------------- the package


def sentence_table(cfg: Config, cases: list[Case]) -> dict:
    """{"sentences": [...], "embeddings": [n, 512]} for every distinct sentence of `cases`,
    through the on-disk embedding cache (the same vectors training looked up)."""
    from ..models.text import sentence_cache

    sentences = sorted({s for c in cases for s in c.sentences})
    cache = sentence_cache(cfg.data.cache_dir, cfg.model.text_pretrained)
    emb = cache.embed(sentences) if sentences else torch.empty(0, 512)
    return {"sentences": sentences, "embeddings": emb.float().contiguous(), "encoder": cache.path.stem,
            "text_pretrained": cfg.model.text_pretrained}  # fmt: skip


def build_package(cfg: Config, runs: list[dict], cohort: Cohort, out_dir: str | Path, extra_meta: dict | None = None) -> Path:
    """Write the model directory.

    `runs`: ``[{"name": "fold1", "weights": Path to best.pt, "train_cases": [Case, ...]}, ...]``
    (``train_cases`` only matters for the MLP tabular embedding, whose scaling is fitted on
    each run's training part).
    """
    from cfcml.datasets.men.reader import NUMERIC_ATTRIBUTES

    out = Path(out_dir)
    (out / "weights").mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    meta_runs = []
    for r in runs:
        state = torch.load(r["weights"], map_location="cpu", weights_only=False)
        torch.save({"model": state["model"], "epoch": state.get("epoch"), "val": state.get("val")}, out / "weights" / f"{r['name']}.pt")
        entry = {"name": r["name"], "selected_epoch": None if state.get("epoch") is None else int(state["epoch"]) + 1}
        if cfg.model.tabular_embedding == "mlp" and cfg.dataset == "men":
            entry["fit_on"] = [{a: c.attributes[a] for a in NUMERIC_ATTRIBUTES} for c in r.get("train_cases", [])]
        meta_runs.append(entry)
    if cfg.model.use_tabular and cfg.model.tabular_embedding == "clip":
        torch.save(sentence_table(cfg, cohort.cases), out / "sentences.pt")
    meta = {
        "dataset": cfg.dataset,
        "classes": list(cohort_classes(cfg.dataset)),
        "image_columns": list(image_columns(cfg.dataset)),
        "attribute_columns": list(attribute_names(cfg.dataset)),
        "runs": meta_runs,
        **(extra_meta or {}),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return out


# MLflow nags about type hints on predict (for its own input validation); the signature
# below already describes and enforces the input, so silence it at class creation.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*[Tt]ype hint.*")

    class CfcmlModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper: preprocessing + the packaged models (ensemble mean of probabilities)."""

        def load_context(self, context) -> None:
            self._load(Path(context.artifacts[PACKAGE_ARTIFACT]))

        def _load(self, package: Path) -> None:
            import yaml

            from ..models.cfcml import build_model

            self.meta = json.loads((package / "meta.json").read_text())
            self.cfg = config_from_dict(yaml.safe_load((package / "config.yaml").read_text()))
            self.cfg.data.num_workers = 0
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.table = None
            if (package / "sentences.pt").exists():
                t = torch.load(package / "sentences.pt", map_location="cpu", weights_only=False)
                self.table = {s: e for s, e in zip(t["sentences"], t["embeddings"])}
            self._encoder = None
            num_features = self._num_tabular_features()
            self.models = []
            for r in self.meta["runs"]:
                state = torch.load(package / "weights" / f"{r['name']}.pt", map_location="cpu", weights_only=False)
                model = build_model(self.cfg, cohort_shape(self.cfg.dataset), num_tabular_features=num_features)
                model.load_state_dict(state["model"])
                self.models.append(model.to(self.device).eval())

        # -- tabular inputs
        def _num_tabular_features(self) -> int | None:
            if not self.cfg.model.use_tabular or self.cfg.model.tabular_embedding != "mlp":
                return None
            return 9 if self.cfg.dataset == "men" else 20

        def _embed(self, sentences: list[str]) -> torch.Tensor:
            missing = sorted({s for s in sentences if s not in self.table})
            if missing:
                if self._encoder is None:
                    from ..models.text import ClipTextEncoder

                    log.info("%d sentence(s) not in the packaged table: building the text encoder", len(missing))
                    self._encoder = ClipTextEncoder(self.cfg.model.text_pretrained)
                for s, e in zip(missing, self._encoder.encode(missing)):
                    self.table[s] = e
            return torch.stack([self.table[s] for s in sentences])

        def _tabular(self, cases: list[Case], run: dict) -> torch.Tensor | None:
            if not self.cfg.model.use_tabular:
                return None
            if self.cfg.model.tabular_embedding == "mlp":
                if self.cfg.dataset == "men":
                    from cfcml.datasets.men.reader import men_tabular_features

                    fit_on = [SimpleNamespace(attributes=a) for a in run.get("fit_on", [])] or None
                    return torch.from_numpy(men_tabular_features(cases, fit_on=fit_on))
                from cfcml.datasets.derm7pt.reader import derm7pt_tabular_features

                return torch.from_numpy(derm7pt_tabular_features(cases))
            flat = [s for c in cases for s in c.sentences]
            return self._embed(flat).view(len(cases), len(cases[0].sentences), -1)

        def _dataset(self, cases: list[Case]):
            size = self.cfg.data.image_size
            if self.cfg.dataset == "men":
                from cfcml.datasets.volume_cache import VolumeCache
                from cfcml.datasets.volume_dataset import MenDataset

                return MenDataset(cases, size, train=False, cache=VolumeCache(size))
            from cfcml.datasets.photo_dataset import Derm7ptDataset

            return Derm7ptDataset(cases, size, train=False, color=self.cfg.data.color, cache=False)

        @torch.no_grad()
        def predict_cases(self, cases: list[Case]) -> np.ndarray:
            """[N, K] class probabilities, averaged over the packaged models."""
            if not cases:
                return np.zeros((0, len(self.meta["classes"])), dtype=np.float32)
            loader = torch.utils.data.DataLoader(self._dataset(cases), batch_size=8, shuffle=False, num_workers=0)
            tabular = [self._tabular(cases, r) for r in self.meta["runs"]]
            total = None
            for batch in loader:
                images = [x.to(self.device) for x in batch["images"]] if self.cfg.model.use_images else None
                probs = 0.0
                for model, tab in zip(self.models, tabular):
                    t = tab[batch["index"]].to(self.device) if tab is not None else None
                    probs = probs + model(images=images, tabular=t)["logits"].float().softmax(-1)
                probs = (probs / len(self.models)).cpu().numpy()
                total = probs if total is None else np.concatenate([total, probs])
            return total

        def predict(self, context, model_input, params=None):
            import pandas as pd

            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            cases = [record_to_case(self.meta["dataset"], row) for row in frame.to_dict("records")]
            probs = self.predict_cases(cases)
            classes = self.meta["classes"]
            out = pd.DataFrame({"case_id": [c.case_id for c in cases]})
            for k, name in enumerate(classes):
                out[f"prob_{name}"] = probs[:, k].astype(float)
            out["pred"] = [classes[int(i)] for i in probs.argmax(1)] if len(cases) else []
            return out


# ----------------------------------------------------------------------------- provenance


def cohort_digest(cohort: Cohort) -> str:
    """sha256 over the cohort's cases (id, label, split, sentences) and each image's relative
    path and size — cheap enough for thousands of volumes, and changes with the data."""
    h = hashlib.sha256(f"{cohort.dataset}|{','.join(cohort.classes)}".encode())
    root = Path(cohort.root)
    for c in sorted(cohort.cases, key=lambda c: c.case_id):
        h.update(f"|{c.case_id}|{c.label}|{c.split}|{'/'.join(c.sentences)}".encode())
        for p in (*c.images, c.mask):
            if p is None:
                continue
            p = Path(p)
            rel = p.relative_to(root) if p.is_relative_to(root) else p.name
            h.update(f"|{rel}:{p.stat().st_size if p.exists() else -1}".encode())
    return h.hexdigest()


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
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10, check=True)  # fmt: skip
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


def log_model(package_dir: str | Path, dataset: str, input_example, registered_model_name: str | None = None,
              metadata: dict | None = None, name: str = "model"):
    """Log the package as a pyfunc in the active run (signature, input example, the cfcml code);
    register it when `registered_model_name` is given. Returns MLflow's ModelInfo."""
    import cfcml

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=CfcmlModel(),
        artifacts={PACKAGE_ARTIFACT: str(package_dir)},
        code_paths=[str(Path(cfcml.__file__).resolve().parent)],
        signature=model_signature(dataset),
        input_example=input_example,
        pip_requirements=_requirements(),
        metadata={"dataset": dataset, **(metadata or {})},
        registered_model_name=registered_model_name,
    )


def tag_version(client, name: str, version: str, tags: dict, alias: str | None = ALIAS) -> None:
    """Tags (stringified) on a registered version, then point `alias` at it."""
    for key, value in tags.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, (dict, list)) else repr(value)
        client.set_model_version_tag(name, str(version), key, text[:5000])
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
