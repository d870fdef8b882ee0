"""The study's MLflow records: finding a trial's / the study's run, the held-back patients."""

from __future__ import annotations

import json

from ...engine.splits import ids_digest
from .spec import HOLDOUT_ARTIFACT, TAG_HOLDOUT_DIGEST, TAG_STUDY_PATH, TAG_TRIAL, StudyError


def find_child_run(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
        max_results=5,
    )
    return runs[0].info.run_id if runs else None


def find_parent_run(client, experiment_id: str, study_path: str) -> str | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_STUDY_PATH}` = '{study_path}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def record_holdout(client, parent_id: str, spec, held: list) -> None:
    """The held-back patients on the parent run: param ``holdout`` (the fraction), tag
    ``cfcml.holdout_ids_digest`` and artifact ``holdout_ids.json`` (fraction, seed, ids, digest).
    A resumed study must hold back the same patients, or it is refused."""
    ids = [c.case_id for c in held]
    digest = ids_digest(ids) if ids else "none"
    tags = client.get_run(parent_id).data.tags
    if TAG_HOLDOUT_DIGEST in tags:
        if tags[TAG_HOLDOUT_DIGEST] != digest:
            raise StudyError(
                f"this study held back other patients (ids digest {tags[TAG_HOLDOUT_DIGEST][:12]}, now "
                f"{digest[:12]}): resume it with its own --holdout and --seed"
            )
        return
    client.log_param(parent_id, "holdout", spec.search.holdout)
    client.set_tag(parent_id, TAG_HOLDOUT_DIGEST, digest)
    record = {"fraction": spec.search.holdout, "seed": spec.search.seed, "ids": ids, "ids_digest": digest}
    client.log_text(parent_id, json.dumps(record, indent=2), HOLDOUT_ARTIFACT)
