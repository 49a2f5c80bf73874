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

Vertex AI has no API key: a key alias names a Google Cloud project and location
(`resolve_vertex_target`), given as its endpoint (``my-project/us-central1``, or a URL ending
in ``/projects/my-project/locations/us-central1`` for another host), for the default alias
also by ``GOOGLE_CLOUD_PROJECT`` and ``GOOGLE_CLOUD_LOCATION``. The credentials are
Application Default Credentials (batchdb/providers/vertex.py), never a value stored here.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


VERTEX_PROJECT_ENV = "GOOGLE_CLOUD_PROJECT"
VERTEX_LOCATION_ENV = "GOOGLE_CLOUD_LOCATION"
# google-genai's default location when none is given.
VERTEX_DEFAULT_LOCATION = "global"


@dataclass(frozen=True, slots=True)
class VertexTarget:
    """Where a Vertex AI key alias sends its calls: a project's quota in one location."""

    project: str
    location: str
    # scheme://host[:port][/prefix] of another server (the simulator, a proxy); None: Google's.
    base_url: str | None = None

    @property
    def host(self) -> str:
        if self.base_url:
            return self.base_url
        if self.location == VERTEX_DEFAULT_LOCATION:
            return "https://aiplatform.googleapis.com"
        return f"https://{self.location}-aiplatform.googleapis.com"

    @property
    def endpoint(self) -> str:
        """The location's resource URL: what the lane advertises and errors name."""
        return f"{self.host}/v1/projects/{self.project}/locations/{self.location}"


def resolve_vertex_target(alias: str = DEFAULT_ALIAS) -> VertexTarget:
    """The project and location `alias` names for provider ``vertex``; raises `MissingSecret`.

    The alias's endpoint (``BATCHDB_ENDPOINT_VERTEX_<ALIAS>`` or the secrets file's
    ``[endpoints.vertex]``) is ``PROJECT/LOCATION``, ``projects/P/locations/L``, or a URL
    ``https://host[/v1]/projects/P/locations/L`` for a server other than Google's. For the
    default alias ``GOOGLE_CLOUD_PROJECT`` (with ``GOOGLE_CLOUD_LOCATION``, default ``global``)
    serves too, the variables google-genai itself reads.
    """
    _, alias = _normalise("vertex", alias)
    value = resolve_endpoint("vertex", alias)
    if value is None and alias == DEFAULT_ALIAS:
        project = _from_env([VERTEX_PROJECT_ENV])
        if project:
            return VertexTarget(project, _from_env([VERTEX_LOCATION_ENV]) or VERTEX_DEFAULT_LOCATION)
    if value is None:
        extra = f", {VERTEX_PROJECT_ENV}" if alias == DEFAULT_ALIAS else ""
        raise MissingSecret(
            f"no Vertex AI project for key alias {alias!r}: checked {describe_endpoint_sources('vertex', alias)}{extra}"
        )
    target = _parse_vertex_target(value)
    if target is None:
        raise MissingSecret(
            f"the Vertex AI endpoint for key alias {alias!r} must be PROJECT/LOCATION or a URL ending in "
            f"/projects/PROJECT/locations/LOCATION, got {value!r}"
        )
    return target


def _parse_vertex_target(value: str) -> VertexTarget | None:
    parts = urlsplit(value) if "://" in value else None
    path = parts.path if parts is not None else value
    segments = [s for s in path.split("/") if s]
    if "projects" in segments:
        at = segments.index("projects")
        if segments[at + 2 : at + 3] != ["locations"] or len(segments) != at + 4:
            return None
        prefix, project, location = segments[:at], segments[at + 1], segments[at + 3]
    elif parts is None and len(segments) == 2:
        prefix, (project, location) = [], segments
    else:
        return None
    if parts is None:
        return VertexTarget(project, location) if not prefix else None
    if prefix and prefix[-1] in ("v1", "v1beta1"):
        prefix = prefix[:-1]
    base = f"{parts.scheme}://{parts.netloc}" + "".join(f"/{s}" for s in prefix)
    return VertexTarget(project, location, base)


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
