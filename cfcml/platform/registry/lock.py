"""The promotion lock: one promotion of a model at a time (no lost update).

The lock is the registered model ``<name>--promotion-lock``: creating a registered model is
atomic in MLflow (its name is unique in the store), so of two concurrent promotions one
creates it and the other waits; the holder deletes it when done. A lock unchanged for
:data:`LOCK_STALE_S` seconds was left by a killed process and is broken.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .errors import PromotionError, is_not_found

LOCK_SUFFIX = "--promotion-lock"
LOCK_WAIT_S = 120.0  # how long a promotion waits for another one of the same model
LOCK_STALE_S = 120.0  # a lock unchanged this long was left by a killed process
_TOKEN_TAG = "cfcml.promotion_lock"


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def promotion_lock(
    client: MlflowClient, name: str, wait: float = LOCK_WAIT_S, stale: float = LOCK_STALE_S
) -> Iterator[str]:
    """Hold the promotion lock of model ``name`` (see the module docstring); yields its token."""
    lock, token = lock_name(name), secrets.token_hex(8)
    _acquire(client, name, token=token, wait=wait, stale=stale)
    try:
        yield token
    finally:
        try:
            if (client.get_registered_model(lock).tags or {}).get(_TOKEN_TAG) == token:
                _delete_quietly(client, lock)
        except MlflowException:
            pass  # broken as stale by another process: not ours to delete


def _acquire(client: MlflowClient, name: str, *, token: str, wait: float, stale: float) -> None:
    """Create the lock of model ``name`` holding ``token``; wait while another process holds it."""
    lock = lock_name(name)
    deadline, seen = time.monotonic() + wait, None  # seen: (lock's creation time, when we first saw it)
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={_TOKEN_TAG: token, "cfcml.lock_for": name},
                description=f"held while a promotion of {name} runs; deleted after it",
            )
            return
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).creation_timestamp
        except MlflowException as e:
            if is_not_found(e):
                continue  # released between our create and our read: try again at once
            raise
        now = time.monotonic()
        if seen is None or seen[0] != held:
            seen = (held, now)
        elif now - seen[1] > stale:  # the same lock for too long: its holder died
            _delete_quietly(client, lock)
            seen = None
            continue
        if now > deadline:
            raise PromotionError(
                f"another promotion of {name} has held the lock {lock!r} for over {wait:.0f} s; nothing changed — "
                "try again later (a lock left by a killed process is removed after "
                f"{stale:.0f} s, or delete that registered model)"
            )
        time.sleep(0.05 + secrets.randbelow(100) / 1000)


def _delete_quietly(client: MlflowClient, lock: str) -> None:
    try:
        client.delete_registered_model(lock)
    except MlflowException as e:
        if not is_not_found(e):
            raise
