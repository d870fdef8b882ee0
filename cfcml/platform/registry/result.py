"""What a promotion decided, and the message that says so."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .metrics import format_value


@dataclass(frozen=True)
class PromotionResult:
    """What the gate decided. ``champion`` is the champion version after the call."""

    name: str
    candidate_version: str
    promoted: bool
    forced: bool
    metric: str
    candidate_value: float | None
    previous_champion: str | None
    champion_value: float | None
    champion: str | None
    message: str
    reason: str | None = None
    attempts: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.message


def with_promoted_message(r: PromotionResult, label: str) -> PromotionResult:
    """``r`` (a promotion of ``label``) with the message that says what moved and why."""
    m = r.metric
    if r.forced:
        was = "v" + r.previous_champion if r.previous_champion else "none"
        message = (
            f"forced: {label} is now champion (was {was}; {m} {format_value(r.candidate_value)} vs "
            f"{format_value(r.champion_value)}); reason: {r.reason}"
        )
    elif r.previous_champion is None:
        message = f"promoted: {label} is the first champion ({m}={format_value(r.candidate_value)})"
    else:
        message = (
            f"promoted: {label} {m}={format_value(r.candidate_value)} beats champion v{r.previous_champion} "
            f"{m}={format_value(r.champion_value)}"
        )
    return replace(r, message=message)
