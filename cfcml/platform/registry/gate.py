"""The comparison rules of the promotion gate and their refusal messages.

Pure functions over plain data (an :class:`~.evaluation.Evaluation`, a :class:`Protocol`, a
:class:`~.metrics.MetricSpec`): what a version's gate value is, whether two measurements are
like with like (same kind, patients, data and protocol) and whether the candidate is better.
Reading the versions from a server is :mod:`.versions`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..protocol_digest import PROTOCOL_DIGEST_KEY, PROTOCOL_KEY, fields_digest, protocol_differences
from .errors import PromotionError
from .evaluation import EVALUATION_FILE, OWN_KINDS, Evaluation
from .metrics import MetricSpec, format_value


@dataclass(frozen=True)
class Protocol:
    """How a version was trained and selected (:mod:`cfcml.platform.protocol_digest`)."""

    digest: str
    fields: dict | None  # None when only the digest was recorded


@dataclass(frozen=True)
class Measurement:
    """A version's gate value and what it was measured on."""

    value: float
    evaluation: Evaluation
    protocol: Protocol


@dataclass(frozen=True)
class Verdict:
    """The gate's decision on a candidate that could be compared."""

    promote: bool
    candidate: Measurement
    champion: Measurement | None
    message: str = ""


def parse_protocol(sources: Iterable[Mapping[str, str]], who: str) -> Protocol:
    """The protocol recorded in the first of ``sources`` (param or tag mappings) that records one.
    Fields and digest that disagree are refused."""
    for source in sources:
        digest, text = source.get(PROTOCOL_DIGEST_KEY), source.get(PROTOCOL_KEY)
        if not digest and not text:
            continue
        fields = None
        if text:
            try:
                fields = json.loads(text)
            except json.JSONDecodeError:
                raise PromotionError(f"{who}: {PROTOCOL_KEY} is not valid JSON") from None
            if not isinstance(fields, dict):
                raise PromotionError(f"{who}: {PROTOCOL_KEY} is not a JSON object")
            if digest and fields_digest(fields) != digest:
                raise PromotionError(f"{who}: {PROTOCOL_DIGEST_KEY} {digest} is not the digest of its {PROTOCOL_KEY}")
        return Protocol(digest or fields_digest(fields), fields)
    raise PromotionError(
        f"{who} records no {PROTOCOL_DIGEST_KEY} (param of its source run or version tag), so it is unknown whether "
        "it was measured under the champion's protocol; use --force --reason to promote anyway"
    )


def gate_value(evaluation: Evaluation, spec: MetricSpec, who: str) -> float:
    """``spec``'s value in ``evaluation``, checked: measured on untouched patients, present, valid."""
    if evaluation.kind not in OWN_KINDS:
        raise PromotionError(
            f"{who} has no test metric of its own: its {EVALUATION_FILE} is of kind {evaluation.kind!r} (the "
            "cross-validated estimate of single fold models; every patient trained or selected some member of the "
            f"package), so it cannot be compared; register it from a study with --holdout, or use --force --reason"
        )
    value = evaluation.metrics.get(spec.name)
    if value is None:
        have = ", ".join(sorted(evaluation.metrics))
        raise PromotionError(f"{who}: its {EVALUATION_FILE} has no metric {spec.name!r} (it has: {have})")
    return spec.check(value, who)


def differences(cand: Measurement, champ: Measurement) -> list[str]:
    """What makes the two measurements incomparable (empty: like with like)."""
    a, b = cand.evaluation, champ.evaluation
    out = []
    if a.kind != b.kind:
        out.append(f"evaluation kind {a.kind} vs {b.kind}")
    if a.ids_digest != b.ids_digest:
        only_a, only_b = len(set(a.ids) - set(b.ids)), len(set(b.ids) - set(a.ids))
        out.append(
            f"patients: ids digest {a.ids_digest[:16]} ({len(a.ids)} ids) vs {b.ids_digest[:16]} ({len(b.ids)} ids), "
            f"{only_a} only in the candidate, {only_b} only in the champion"
        )
    if a.data_digest != b.data_digest:
        out.append(f"data: data_digest {a.data_digest[:16]} vs {b.data_digest[:16]}")
    pa, pb = cand.protocol, champ.protocol
    if pa.digest != pb.digest:
        named = protocol_differences(pa.fields, pb.fields) if pa.fields is not None and pb.fields is not None else []
        out.append(
            f"protocol: {PROTOCOL_DIGEST_KEY} {pa.digest} vs {pb.digest}" + (f" ({'; '.join(named)})" if named else "")
        )
    return out


def judge(
    cand: Measurement, champ: Measurement, *, spec: MetricSpec, label: str, champ_label: str, champion_version: str
) -> Verdict:
    """Compare the candidate (``label``) with the champion (``champ_label``, version
    ``champion_version``). Raises :class:`PromotionError` when they were not measured alike;
    returns a refusal verdict when the candidate is not strictly better."""
    found = differences(cand, champ)
    if found:
        raise PromotionError(
            f"{label} and {champ_label} were not measured alike — {'; '.join(found)}: their {spec.name} values "
            "are not comparable; use --force --reason to promote anyway"
        )
    if not spec.better(cand.value, champ.value):
        return Verdict(
            False,
            cand,
            champ,
            f"refused: {label} {spec.name}={format_value(cand.value)} is not better than champion v{champion_version} "
            f"{spec.name}={format_value(champ.value)} ({'higher' if spec.greater_is_better else 'lower'} is better, "
            f"{cand.evaluation.kind}, {len(cand.evaluation.ids)} patients); champion unchanged",
        )
    return Verdict(True, cand, champ)
