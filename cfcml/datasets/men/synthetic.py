"""Synthetic MEN cohort in layout A (see `cfcml.datasets.men.reader`), for tests, demos and smoke runs.

Every patient is a small analytic phantom — a brain-tissue region (zero outside), a
CSF pocket, a tumour ellipsoid and a peritumoural edema shell — sampled on three different
voxel grids that cover the same space (T1C at full, FLAIR-C at 5/6 in-plane and 6 mm slices,
ADC at half in-plane resolution), like real series before co-registration.

The class signal is split so that fusion wins (docs/synthetic_cohorts.md has the numbers):
each image series carries one independent noisy cue `z = CUE_MEANS[series][class] + N(0, 1)`,
and the images and the table each hold the strong cue of a different rare class:

- FLAIR-C: edema-shell signal, strongly brighter for G2inv (the images' main cue),
- T1C: tumour enhancement, slightly brighter for G2 (weak),
- ADC: tumour diffusivity, slightly lower for G2ninv (weak),
- table: location (mostly "other location" for G2ninv — the table's main cue), a coarse ADC
  value (lower for G2ninv, rounded to 50) and sex — categorical or few-valued, so a randomly
  initialised text encoder can read them from the sentences.

Macro one-vs-rest AUC is dominated by how well each rare class is told from G1, so neither
the images (no G2ninv cue worth the name) nor the table (no G2inv cue) gets far alone.
Age, tumour area and edema area are realistic but carry no class signal.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from cfcml.datasets.cohort import Case
from cfcml.datasets.men.authors_layout import GRADE_DIRS, SERIES_FILES
from cfcml.datasets.reader import load_cohort
from cfcml.datasets.rows import parse_attribute
from cfcml.datasets.spec import load_spec
from cfcml.datasets.tabular import tabular_features

MEN = load_spec("men")
CLASSES, MODALITIES = MEN.classes, MEN.series

CLASS_SHARE = np.array([650, 60, 86]) / 796  # the real cohort's imbalance
CUE_MEANS = {  # per class (G1, G2inv, G2ninv), in units of the cue's noise s.d.
    "T1C": (0.0, 0.5, 0.5),
    "FLAIR_C": (0.0, 3.0, 0.0),
    "ADC": (0.0, 0.0, -0.6),
}
LOCATION_P = np.array([[0.50, 0.45, 0.05], [0.50, 0.40, 0.10], [0.10, 0.15, 0.75]])  # P(loc 1/2/3 | class)
MALE_P = np.array([0.35, 0.50, 0.50])  # P(sex = 1 | class)
ADC_VALUE_MEAN = np.array([900.0, 900.0, 720.0])  # tabular ADC value (1e-6 mm^2/s) per class
ADC_VALUE_SD = 80.0

T1C_SPACING = (1.0, 1.0, 5.0)  # mm; 2D axial post-contrast T1
MASK_MARGIN_MM = 2.0


@dataclass
class PatientPlan:
    """Everything drawn for one patient before rendering (world coordinates in mm)."""

    case_id: str
    label: int
    fold: int
    cues: dict  # modality -> cue value z
    attributes: dict  # clinical.csv cells as written (strings)
    center: np.ndarray  # tumour centre relative to the FOV centre
    radius: float  # tumour radius (in-plane and through-plane)
    edema: float  # edema shell thickness
    csf_center: np.ndarray
    origin_shift: np.ndarray  # patient position: where the FOV centre lies in scanner space
    gains: dict  # per-series scanner gain (z-scoring removes it)
    has_mask: bool
    seed: int  # of the voxel noise and texture


def class_counts(patients: int, folds: int) -> np.ndarray:
    """Patients per class in the real cohort's proportions, at least `folds` of each."""
    if patients < 3 * folds:
        raise ValueError(f"need at least {3 * folds} patients for {folds} folds with every class in each")
    want = CLASS_SHARE * patients
    counts = np.floor(want).astype(int)
    while counts.sum() < patients:  # largest remainder first
        counts[np.argmax(want - counts)] += 1
    for c in range(3):  # small cohorts: top up rare classes from the largest one
        while counts[c] < folds:
            counts[c] += 1
            counts[np.argmax(counts)] -= 1
    return counts


def plan_cohort(patients: int = 796, seed: int = 0, folds: int = 3, mask_fraction: float = 0.5) -> list[PatientPlan]:
    """Draw labels, stratified folds, cues, geometry and the clinical table (no voxels)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), class_counts(patients, folds))
    rng.shuffle(labels)
    fold_of = np.empty(patients, dtype=int)
    for c in range(3):  # stratified: deal each class's patients round-robin from a random fold
        idx = np.flatnonzero(labels == c)
        fold_of[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds + 1
    return [_plan_patient(i, int(labels[i]), int(fold_of[i]), seed, mask_fraction) for i in range(patients)]


def _plan_patient(i: int, label: int, fold: int, seed: int, mask_fraction: float) -> PatientPlan:
    rng = np.random.default_rng([seed, i])  # one stream per patient: independent of the others
    cues = {m: CUE_MEANS[m][label] + rng.normal() for m in MODALITIES}
    radius = rng.uniform(6.0, 11.0)
    edema = rng.uniform(3.0, 7.0)
    location = rng.choice(3, p=LOCATION_P[label]) + 1
    sex = int(rng.random() < MALE_P[label])
    adc_value = int(np.clip(np.round(rng.normal(ADC_VALUE_MEAN[label], ADC_VALUE_SD) / 50) * 50, 600, 1200))
    age = int(np.clip(np.round(rng.normal(56, 13)), 20, 85))
    attributes = {
        "location": str(location),
        "sex": str(sex),
        "age": str(age),
        "adc_value": str(adc_value),
        "tumor_area": f"{np.pi * radius**2 / 100:.2f}",  # cm^2, largest axial cross-section
        "edema_area": f"{np.pi * ((radius + edema) ** 2 - radius**2) / 100:.2f}",  # cm^2, the shell
    }
    return PatientPlan(
        case_id=f"MEN{i + 1:04d}",
        label=label,
        fold=fold,
        cues=cues,
        attributes=attributes,
        center=np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-8, 8)]),
        radius=radius,
        edema=edema,
        csf_center=np.array([rng.choice([-1, 1]) * 16.0, rng.uniform(-12, 12), 0.0]),
        origin_shift=rng.uniform(-20, 20, size=3),
        gains={
            "T1C": rng.uniform(0.8, 1.25),
            "FLAIR_C": rng.uniform(0.8, 1.25),
            "ADC": 1.0,
        },  # ADC is quantitative
        has_mask=bool(rng.random() < mask_fraction),
        seed=int(rng.integers(2**31)),
    )


# ----------------------------------------------------------------------------- grids


def series_grids(shape=(48, 48, 12)) -> dict[str, tuple[tuple[int, int, int], np.ndarray]]:
    """{series: (voxel shape, affine)} for grids covering one FOV centred on the origin.

    `shape` is the T1C grid (X, Y, Z). FLAIR-C has 5/6 of its in-plane voxels and 6 mm slices,
    ADC half its in-plane voxels: different grids, same space.
    """
    fov = np.array(shape) * np.array(T1C_SPACING)
    nx, ny, nz = shape
    shapes = {
        "T1C": (nx, ny, nz),
        "FLAIR_C": (max(2, round(nx * 5 / 6)), max(2, round(ny * 5 / 6)), max(2, round(fov[2] / 6.0))),
        "ADC": (max(2, nx // 2), max(2, ny // 2), nz),
    }
    out = {}
    for name, n in shapes.items():
        spacing = fov / np.array(n)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -fov / 2 + spacing / 2  # voxel centres; the box is [-fov/2, fov/2]
        out[name] = (n, affine)
    return out


@lru_cache(maxsize=8)
def _world_grids(shape: tuple) -> dict[str, np.ndarray]:
    """World coordinates [X, Y, Z, 3] of every voxel centre, per series (same for all patients)."""
    out = {}
    for name, (n, affine) in series_grids(shape).items():
        ijk = np.stack(np.meshgrid(*[np.arange(k, dtype=np.float32) for k in n], indexing="ij"), axis=-1)
        out[name] = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    return out


def _dist(xyz: np.ndarray, center, scale=(1.0, 1.0, 1.0)) -> np.ndarray:
    d = (xyz - np.asarray(center, dtype=np.float32)) / np.asarray(scale, dtype=np.float32)
    return np.sqrt(np.einsum("...i,...i->...", d, d))


# ----------------------------------------------------------------------------- rendering


def render(plan: PatientPlan, shape=(48, 48, 12)) -> dict:
    """Voxel arrays (int16) + affines for one patient, plus the truth regions per series.

    Returns {"series": {name: (array, affine)}, "mask": (array, affine) | None,
    "regions": {name: {"tumor": bool array, "edema": ..., "tissue": ...}}}.
    """
    from scipy.ndimage import gaussian_filter  # scipy.ndimage and nibabel take ~1 s each: only when writing

    rng = np.random.default_rng(plan.seed)
    shape = tuple(int(n) for n in shape)
    fov = np.array(shape) * np.array(T1C_SPACING)
    grids = _world_grids(shape)
    out = {"series": {}, "regions": {}, "mask": None}
    for name, (n, affine) in series_grids(shape).items():
        xyz = grids[name]
        r_tumor = _dist(xyz, plan.center)
        tumor = r_tumor <= plan.radius
        edema = ~tumor & (r_tumor <= plan.radius + plan.edema)
        head = _dist(xyz[..., :2], (0, 0), 0.5 * fov[:2]) <= 0.99  # an elliptic cylinder of tissue
        csf = _dist(xyz, plan.csf_center, (4.0, 6.0, 15.0)) <= 1
        texture = gaussian_filter(rng.standard_normal(size=n, dtype=np.float32), sigma=(1.5, 1.5, 0.5), truncate=3.0)
        texture /= texture.std() + 1e-8
        img = _intensities(name, plan, tumor, edema, csf, texture)
        img = img * (1 + 0.03 * rng.standard_normal(size=n, dtype=np.float32))  # acquisition noise
        img = np.where(head, np.clip(img, 1, None), 0.0)  # outside the head is exactly 0
        world_affine = affine.copy()
        world_affine[:3, 3] += plan.origin_shift
        out["series"][name] = (np.round(img).astype(np.int16), world_affine)
        out["regions"][name] = {
            "tumor": tumor & head,
            "edema": edema & head,
            "tissue": head & ~tumor & ~edema & ~csf,
        }
        if name == "T1C" and plan.has_mask:
            roi = r_tumor <= plan.radius + plan.edema + MASK_MARGIN_MM
            out["mask"] = (roi.astype(np.uint8), world_affine)
    return out


def _intensities(name, plan, tumor, edema, csf, texture) -> np.ndarray:
    """Raw signal of one series: tissue, CSF, edema shell and tumour, carrying its cue."""
    z = plan.cues[name]
    g = plan.gains[name]
    if name == "T1C":  # enhancing tumour; the enhancement is the cue
        tissue, csf_v, edema_v, tumor_v = 420.0, 150.0, 390.0, 420.0 * (1.6 + 0.22 * z)
        tex = 0.06
    elif name == "FLAIR_C":  # CSF suppressed; the edema-shell signal is the cue
        tissue, csf_v, edema_v, tumor_v = 300.0, 60.0, 300.0 * (1.35 + 0.22 * z), 340.0
        tex = 0.06
    else:  # ADC in 1e-6 mm^2/s: CSF ~2900 (clipped to 1200 in preprocessing); tumour ADC is the cue
        tissue, csf_v, edema_v, tumor_v = 780.0, 2900.0, 1150.0, 820.0 + 70.0 * z
        tex = 0.05
    img = np.full(texture.shape, tissue, dtype=np.float32)
    img[csf] = csf_v
    img[edema] = edema_v
    img[tumor] = max(tumor_v, 50.0)
    return g * img * (1 + tex * texture)


# ----------------------------------------------------------------------------- writing


def write_synthetic_men(
    out, patients: int = 796, seed: int = 0, folds: int = 3, shape=(48, 48, 12), mask_fraction: float = 0.5
) -> Path:
    """Write a layout-A MEN cohort under `out` (created); return `out`.

    Deterministic for a given (patients, seed, folds, shape, mask_fraction). `shape` is the
    T1C voxel grid (X, Y, Z); the other series use their own grids over the same space.
    """
    import nibabel as nib  # ~1 s to import: only when volumes are written

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plans = plan_cohort(patients, seed, folds, mask_fraction)
    with open(out / "clinical.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "grade", "sex", "age", "location", "adc_value", "tumor_area", "edema_area", "fold"])
        for p in plans:
            a = p.attributes
            w.writerow(
                [
                    p.case_id,
                    CLASSES[p.label],
                    a["sex"],
                    a["age"],
                    a["location"],
                    a["adc_value"],
                    a["tumor_area"],
                    a["edema_area"],
                    p.fold,
                ]
            )
    for p in plans:
        folder = out / "images" / p.case_id
        folder.mkdir(exist_ok=True)
        vols = render(p, shape)
        for name, (arr, affine) in vols["series"].items():
            nib.save(_nifti(arr, affine), folder / f"{name}.nii.gz")
        if vols["mask"] is not None:
            nib.save(_nifti(*vols["mask"]), folder / "mask.nii.gz")
    return out


def _nifti(arr, affine):
    import nibabel as nib  # ~1 s to import: only when volumes are written

    img = nib.Nifti1Image(arr, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # scanner coordinates, as converters write them
    img.set_sform(affine, code=1)
    return img


def convert_to_layout_b(src, out) -> Path:
    """Rewrite a layout-A cohort as layout B (the authors' folders); returns `out`.

    Series are copied unchanged (real layout-B data is pre-cropped; the reader does not
    care), masks are dropped, and the clinical CSV keeps every column except `fold`.
    """
    src, out = Path(src), Path(out)
    cohort = load_cohort(MEN, src)
    k = len(cohort.splits)
    for case in cohort.cases:
        test_fold = int(case.split.removeprefix("fold"))
        for f in range(1, k + 1):
            part = "test" if f == test_fold else "train"
            folder = out / f"{f}fold" / part / GRADE_DIRS[case.label] / case.case_id
            folder.mkdir(parents=True, exist_ok=True)
            for path, series in zip(case.images, MODALITIES):
                shutil.copyfile(path, folder / SERIES_FILES[series])
    with open(src / "clinical.csv", newline="") as fin, open(out / "clinical.csv", "w", newline="") as fout:
        rows = list(csv.DictReader(fin))
        keep = [c for c in rows[0] if c != "fold"]
        w = csv.DictWriter(fout, keep, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out


# ----------------------------------------------------------------------------- signal check


def summary_features(plan: PatientPlan, shape=(48, 48, 12)) -> dict[str, np.ndarray]:
    """Simple per-modality features of one rendered patient (what a radiologist would measure).

    Each image series: tumour mean and edema-shell mean relative to the tissue median (gain
    free). The table: `men_tabular_features`-style vector of the categorical/coarse values.
    """
    vols = render(plan, shape)
    feats = {}
    for name, (arr, _) in vols["series"].items():
        reg = vols["regions"][name]
        ref = np.median(arr[reg["tissue"]])
        feats[name] = np.array([arr[reg["tumor"]].mean() / ref, arr[reg["edema"]].mean() / ref])
    return feats


def measure_signal(patients: int = 796, seed: int = 0, shape=(48, 48, 12)) -> dict[str, float]:
    """Cross-validated macro one-vs-rest AUC of logistic regressions on `summary_features`
    per modality alone, for the three image series together, and for everything fused.
    """
    # scikit-learn takes seconds to import: only this self-check (benchmarks, tests) needs it
    from sklearn.linear_model import LogisticRegression  # scikit-learn: only for this signal check
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    plans = plan_cohort(patients, seed)
    y = np.array([p.label for p in plans])
    per = [summary_features(p, shape) for p in plans]
    cases = [
        Case(
            p.case_id,
            p.label,
            "",
            (),
            {a.column: parse_attribute(a, p.attributes[a.column])[0] for a in MEN.attributes},
            (),
        )
        for p in plans
    ]
    tab = tabular_features(MEN, cases)
    blocks = {m: np.stack([f[m] for f in per]) for m in MODALITIES} | {"tabular": tab}
    blocks["images"] = np.concatenate([blocks[m] for m in MODALITIES], axis=1)
    blocks["all"] = np.concatenate([blocks["images"], tab], axis=1)

    def auc(x):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        cv = StratifiedKFold(3, shuffle=True, random_state=seed)
        prob = cross_val_predict(model, x, y, cv=cv, method="predict_proba")
        return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))

    return {k: auc(v) for k, v in blocks.items()}
