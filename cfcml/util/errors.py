"""Errors that every layer may raise and the front door turns into an exit status."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run (the CLI's exit 2); the message names the key."""
