"""Redaction for platform code: the one function lives in `cfcml.util.redact` (every layer uses it)."""

from __future__ import annotations

from ..util.redact import MASK, one_line, redact

__all__ = ["MASK", "one_line", "redact"]
