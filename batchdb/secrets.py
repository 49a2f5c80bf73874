"""API keys: read from the environment or a secrets file, never stored or printed.

A job names a key by alias; the key itself stays in the worker's process.
"""

from __future__ import annotations

import os

_MASK = "***"


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every known secret replaced, for errors and logs."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _MASK)
    return text


def env_key(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default
