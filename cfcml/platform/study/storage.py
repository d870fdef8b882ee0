"""Where a study keeps its state: Ray storage (a local path or a URI) and the Optuna RDB."""

from __future__ import annotations

from pathlib import Path


def join_uri(base: str, *parts: str) -> str:
    """`base`/parts for a local path or a URI whose query (``?endpoint_override=...``) stays last."""
    if "://" not in base:
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return head.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts) + (sep + query if sep else "")


def normalize_storage(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def storage_filesystem(storage: str):
    """(pyarrow filesystem, path) of a storage location (query parameters understood)."""
    import pyarrow.fs

    if "://" not in storage:
        return pyarrow.fs.LocalFileSystem(), storage
    return pyarrow.fs.FileSystem.from_uri(storage)


def optuna_url(given: str | None, storage: str, name: str) -> str:
    """The Optuna study's SQLAlchemy URL: `given`, else SQLite beside a local study (in
    ~/.cache/cfcml/optuna for a remote one); a SQLite file's folder is created."""
    url = given or (
        f"sqlite:///{Path(storage) / f'{name}.optuna.db'}"
        if "://" not in storage
        else f"sqlite:///{Path('~/.cache/cfcml/optuna').expanduser() / f'{name}.db'}"
    )
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return url
