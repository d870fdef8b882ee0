"""One redaction function for every URI or message that leaves the process.

``redact(text)`` removes credentials wherever they appear in a string — a bare URI, a
command line, an exception message, a JSON summary:

* URI user info: ``postgresql://user:pw@db`` → ``postgresql://user:***@db``; object-store
  URIs lose both parts (``s3://KEY:SECRET@bucket`` → ``s3://***:***@bucket``), and so do
  ``http(s)`` URIs carrying a bare token (``https://TOKEN@host`` → ``https://***@host``);
* ``key=value`` pairs whose key names a secret (``password``, ``token``, ``secret``,
  ``access_key``, ``aws_secret_access_key``, ``X-Amz-Signature``, ``sig``, ...), in query
  strings and in free text alike: ``?password=pw`` → ``?password=***``;
* ``Authorization: Bearer <token>`` / ``Basic <b64>`` headers.

``redact(text, limit=N)`` also shortens the result to at most N characters (for tags and
one-line error messages). Redaction is deterministic, so a redacted value can still be used
as a lookup key (e.g. a tag compared with ``redact(uri)``).
"""

from __future__ import annotations

import re

MASK = "***"

# schemes whose user info is a credential pair even in the "user" part (access key ids)
_OBJECT_STORES = ("s3", "s3a", "s3n", "gs", "gcs", "abfs", "abfss", "az", "wasb", "wasbs", "oss", "r2", "hf")
_TOKEN_IN_USER = ("http", "https", "ftp", "ftps", "git+https", "ws", "wss", *_OBJECT_STORES)

# scheme://userinfo@ — userinfo may not contain '/', '@' or whitespace; the last '@' before
# the host wins (passwords may contain '@' only percent-encoded, but be generous)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*)://(?P<userinfo>[^\s/@?#'\"]+(?:@[^\s/@?#'\"]+)*)@")

# key names that are secrets whatever comes before them (sslpassword, db_password, X-Amz-Security-Token)
_STRONG = (
    r"password|passwd|secret|token|credentials?|signature|api[_-]?key|apikey|access[_-]?key(?:[_-]?id)?"
    r"|secret[_-]?key|private[_-]?key|client[_-]?secret"
)
# short ones that are secrets only as a whole word or after a separator (pwd, db_pass; not bypass)
_WEAK = r"pass|pwd|sig|auth|sas"
# a key=value pair whose key *ends* with a secret word; ``num_tokens=16`` does not match
_KEY_VALUE = re.compile(
    rf"(?P<key>(?<![A-Za-z0-9_\-.])(?:[A-Za-z0-9_.\-]*(?:{_STRONG})|(?:[A-Za-z0-9]+[_.\-])*(?:{_WEAK})))"
    r"(?P<sep>\s*=\s*|\"?\s*:\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,'\"}\]]+)",
    re.IGNORECASE,
)
_AUTH_HEADER = re.compile(r"\b(?P<kind>Bearer|Basic|Token)\s+(?P<cred>[A-Za-z0-9._~+/\-]{8,}=*)")


def _userinfo(match: re.Match) -> str:
    scheme, userinfo = match["scheme"], match["userinfo"]
    lower = scheme.lower()
    if ":" in userinfo:
        user = MASK if lower in _OBJECT_STORES else userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:{MASK}@"
    if lower in _TOKEN_IN_USER:
        return f"{scheme}://{MASK}@"
    return match.group(0)  # e.g. postgresql://user@host: a user name, no secret


def _key_value(match: re.Match) -> str:
    value = match["value"]
    if value == MASK or value.strip("\"'") == MASK:
        return match.group(0)
    quote = value[0] if value[:1] in ("'", '"') else ""
    sep = match["sep"]
    if ":" in sep and not quote and (len(value) < 8 or value.isalpha()):
        return match.group(0)  # "token: none" in prose is not a credential; "token: 9f2c...e1" is
    return f"{match['key']}{sep}{quote}{MASK}{quote}"


def redact(text, *, limit: int | None = None) -> str:
    """``text`` (any object; None → "") with credentials masked, optionally shortened.

    ``limit``: the result is at most ``limit`` characters; a cut is marked with
    ``… (+N chars)`` so a reader knows text is missing.
    """
    if text is None:
        return ""
    s = text if isinstance(text, str) else str(text)
    s = _USERINFO.sub(_userinfo, s)
    s = _KEY_VALUE.sub(_key_value, s)
    s = _AUTH_HEADER.sub(lambda m: f"{m['kind']} {MASK}", s)
    if limit is not None and len(s) > limit:
        keep = max(limit - len(f"… (+{len(s)} chars)"), 0)
        s = s[:keep] + f"… (+{len(s) - keep} chars)"
    return s


def one_line(text, *, limit: int = 500) -> str:
    """``redact`` folded to a single line (for error tags and CLI messages)."""
    s = " | ".join(line.strip() for line in redact(text).splitlines() if line.strip())
    return redact(s, limit=limit)
