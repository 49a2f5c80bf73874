"""Provider adapter tests: a clean key environment per test.

The provider simulator is tests/conftest.py's: one subprocess per session, and the
`simulator(field=value, ...)` fixture gives each test exactly that config, freshly reset.
"""

from __future__ import annotations

import os

import pytest

_KEY_ENVS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "GEMINI_BASE_URL",
    "BATCHDB_SECRETS_FILE",
    "BATCHDB_AZURE_API_VERSION",
)


@pytest.fixture(autouse=True)
def clean_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No key or endpoint from the machine leaks into a test."""
    for name in list(os.environ):
        if name in _KEY_ENVS or name.startswith(("BATCHDB_KEY_", "BATCHDB_ENDPOINT_")):
            monkeypatch.delenv(name)
