"""The clinical report: metrics with bootstrap CIs, calibration, operating points, subgroups,
explanations and missing-input robustness, as report.json + a self-contained report.html.

Entry points: `ReportInputs` (what a report is computed from), `build_report(inputs, out_dir)`,
`model_card_markdown(report_dict[, max_chars])`, `grad_cam(run, target_layer, class_index, ...)`,
`select_cases` / `cam_stage` (which cases and which encoder stage to explain).
"""

from .build import build_report, compute_report
from .card import REGISTRY_DESCRIPTION_MAX, model_card_markdown
from .explain import cam_stage, select_cases
from .inputs import CohortInfo, Explanation, ReportInputs, SplitPredictions

__all__ = [
    "REGISTRY_DESCRIPTION_MAX",
    "CohortInfo",
    "Explanation",
    "ReportInputs",
    "SplitPredictions",
    "build_report",
    "cam_stage",
    "compute_report",
    "grad_cam",
    "model_card_markdown",
    "select_cases",
]


def __getattr__(name):
    if name == "grad_cam":  # torch is imported only when Grad-CAM is asked for
        from .gradcam import grad_cam

        return grad_cam
    raise AttributeError(name)
