"""Content digests of image files, remembered on disk by (path, size, mtime).

A cohort's identity (`Cohort.digest`) and the volume cache key follow what the files hold, not
their names or sizes: an edited `.nii` or mask of the same size is new data. Hashing thousands
of volumes each command would be slow, so digests are kept in a small JSON file keyed by the
absolute path and valid while size and mtime are unchanged (`CFCML_DIGEST_CACHE`, default
`~/.cache/cfcml/file-digests.json`). The file is only a cache: lost or corrupt, it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20
_memo: dict[tuple[str, int, int], str] = {}  # this process's digests


def cache_path() -> Path:
    env = os.environ.get("CFCML_DIGEST_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cfcml" / "file-digests.json"


def _hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _key(path) -> tuple[str, int, int]:
    st = os.stat(path)
    return str(Path(path).absolute()), st.st_size, st.st_mtime_ns


def file_digest(path) -> str:
    """blake2b of a file's bytes, memoised in this process on (path, size, mtime)."""
    key = _key(path)
    if key not in _memo:
        _memo[key] = _hash(key[0])
    return _memo[key]


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".file-digests-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def file_digests(paths) -> dict[str, str]:
    """{str(path): digest} for existing files, reusing the on-disk cache where size and mtime match."""
    keys = {str(p): _key(p) for p in paths}
    missing = [k for k in keys.values() if k not in _memo]
    if missing:
        store = cache_path()
        entries = _load(store)
        changed = False
        for key in missing:
            name, size, mtime = key
            hit = entries.get(name)
            if isinstance(hit, list) and len(hit) == 3 and hit[:2] == [size, mtime]:
                _memo[key] = hit[2]
                continue
            _memo[key] = _hash(name)
            entries[name] = [size, mtime, _memo[key]]
            changed = True
        if changed:
            _save(store, entries)
    return {p: _memo[k] for p, k in keys.items()}
