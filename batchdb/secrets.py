"""API keys and endpoints: resolved in the worker's process, never stored or printed.

A job names a provider and a key *alias* ("default", "team-b"); the worker turns
the alias into a key here, so a key never reaches the database, a log line or an
error message.

Key lookup, first hit wins (`resolve_key`):

1. ``BATCHDB_KEY_<PROVIDER>_<ALIAS>`` (upper-cased, anything not a letter or digit
   becomes ``_``: provider ``openai``, alias ``team-b`` -> ``BATCHDB_KEY_OPENAI_TEAM_B``);
2. for the ``default`` alias only, the provider's standard variable:
   ``OPENAI_API_KEY``; ``AZURE_OPENAI_API_KEY``; ``GEMINI_API_KEY`` then ``GOOGLE_API_KEY``;
3. the secrets file named by ``BATCHDB_SECRETS_FILE`` (JSON, or TOML when the name
   ends in ``.toml``)::

       {
         "openai": {"default": "sk-...", "team-b": "sk-..."},
         "gemini": {"default": "AIza..."},
         "endpoints": {"azure": {"default": "https://my-resource.openai.azure.com"}}
       }

Endpoints (`resolve_endpoint`) follow the same order with ``BATCHDB_ENDPOINT_<PROVIDER>_<ALIAS>``,
then ``OPENAI_BASE_URL`` / ``AZURE_OPENAI_ENDPOINT`` / ``GEMINI_BASE_URL`` for the default
alias, then the file's ``endpoints`` table; no endpoint means the provider's public one.

Every key handed out is remembered (in this process only) so `RedactingFilter` can
mask it in any log record.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import tomllib
from pathlib import Path
from typing import Any

from batchdb import settings
from batchdb.errors import BatchDBError

_MASK = "***"

SECRETS_FILE_ENV = settings.SECRETS_FILE
# The providers' own variables, read for the "default" alias only, in this order.
STANDARD_KEY_ENVS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "azure": ("AZURE_OPENAI_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
}
STANDARD_ENDPOINT_ENVS: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_BASE_URL",),
    "azure": ("AZURE_OPENAI_ENDPOINT",),
    "gemini": ("GEMINI_BASE_URL",),
}
DEFAULT_ALIAS = "default"
_ENDPOINTS_TABLE = "endpoints"

_resolved: set[str] = set()
_resolved_lock = threading.Lock()


class MissingSecret(BatchDBError, LookupError):
    """No key (or endpoint) for a provider and alias. The message names what was checked, never a value."""


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every given secret replaced, for errors and logs (longest first)."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text


def resolved_secrets() -> frozenset[str]:
    """Every key `resolve_key` has handed out in this process."""
    with _resolved_lock:
        return frozenset(_resolved)


def alias_env(kind: str, provider: str, alias: str) -> str:
    """``alias_env("KEY", "openai", "team-b")`` -> ``"BATCHDB_KEY_OPENAI_TEAM_B"``."""
    return "_".join(("BATCHDB", kind, _env_part(provider), _env_part(alias)))


def resolve_key(provider: str, alias: str = DEFAULT_ALIAS) -> str:
    """The API key for `provider` under `alias`; raises `MissingSecret` naming the places checked."""
    provider, alias = _normalise(provider, alias)
    envs = [alias_env("KEY", provider, alias)]
    if alias == DEFAULT_ALIAS:
        envs += STANDARD_KEY_ENVS.get(provider, ())
    key = _from_env(envs) or _from_file((provider, alias), what="key")
    if key is None:
        raise MissingSecret(
            f"no API key for provider {provider!r}, key alias {alias!r}: checked "
            f"{_checked(envs, f'[{provider}] {alias!r}')}"
        )
    with _resolved_lock:
        _resolved.add(key)
    return key


def resolve_endpoint(provider: str, alias: str = DEFAULT_ALIAS) -> str | None:
    """The base URL / endpoint for `provider` under `alias`, or None for the provider's public one."""
    provider, alias = _normalise(provider, alias)
    envs = [alias_env("ENDPOINT", provider, alias)]
    if alias == DEFAULT_ALIAS:
        envs += STANDARD_ENDPOINT_ENVS.get(provider, ())
    return _from_env(envs) or _from_file((_ENDPOINTS_TABLE, provider, alias), what="endpoint")


def describe_endpoint_sources(provider: str, alias: str = DEFAULT_ALIAS) -> str:
    """Where `resolve_endpoint` looks, for an error message when an endpoint is required."""
    provider, alias = _normalise(provider, alias)
    envs = [alias_env("ENDPOINT", provider, alias)]
    if alias == DEFAULT_ALIAS:
        envs += STANDARD_ENDPOINT_ENVS.get(provider, ())
    return _checked(envs, f"[{_ENDPOINTS_TABLE}.{provider}] {alias!r}")


class RedactingFilter(logging.Filter):
    """Masks every resolved key (and any `extra` secrets) in log records.

    Attach it to handlers (``handler.addFilter(RedactingFilter())``): a filter on a
    logger does not see records that propagate from child loggers. Keys resolved
    after the filter was installed are masked too.
    """

    def __init__(self, *extra: str) -> None:
        super().__init__()
        self._extra = tuple(s for s in extra if s)

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = (*resolved_secrets(), *self._extra)
        if not secrets:
            return True
        message = record.getMessage()
        clean = redact(message, *secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, *secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, *secrets)
        return True


def mask_keys_in_root_handlers() -> None:
    """Put a RedactingFilter on every handler of the root logger that has none (idempotent):
    the CLI does it for every command, a worker however it was started."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


# -- internals -------------------------------------------------------------------------


def _env_part(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", value).upper()


def _normalise(provider: str, alias: str | None) -> tuple[str, str]:
    provider = (provider or "").strip().lower()
    alias = (alias or DEFAULT_ALIAS).strip()
    if not provider:
        raise MissingSecret("no provider named")
    return provider, alias


def _from_env(names: list[str]) -> str | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _checked(envs: list[str], file_entry: str) -> str:
    file = os.environ.get(SECRETS_FILE_ENV)
    where = f"secrets file {file} ({SECRETS_FILE_ENV}) entry {file_entry}" if file else f"{SECRETS_FILE_ENV} (not set)"
    return f"environment variable(s) {', '.join(envs)}; {where}"


def _from_file(path: tuple[str, ...], *, what: str) -> str | None:
    file = os.environ.get(SECRETS_FILE_ENV)
    if not file:
        return None
    node: Any = _load_file(Path(file))
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    if node is None:
        return None
    if not isinstance(node, str) or not node.strip():
        entry = ".".join(path[:-1])
        raise MissingSecret(f"secrets file {file}: the {what} for [{entry}] {path[-1]!r} must be a non-empty string")
    return node.strip()


def _load_file(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MissingSecret(f"secrets file {path} ({SECRETS_FILE_ENV}) cannot be read: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(raw.decode())
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        # Decoder messages give a position, not the text, so no key leaks through them.
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise MissingSecret(f"secrets file {path} is not valid {kind}: {exc}") from None
