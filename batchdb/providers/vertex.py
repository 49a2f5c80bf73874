"""Google Vertex AI (Gemini on Google Cloud) through google-genai with ``vertexai=True``.

The wire format, the request conversion, the response and the error JSON are the Gemini API's,
so everything but the client is `GenAIProvider`'s (providers/gemini.py). What differs:

- No API key. The caller is an OAuth access token from Application Default Credentials (a
  service-account file named by ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
  application-default login``, or the metadata server on Google Cloud), which google-auth
  refreshes before it expires; or, for one key alias, an access token the worker is given
  (``BATCHDB_KEY_VERTEX_<ALIAS>``, e.g. ``gcloud auth print-access-token``), which is not
  refreshed. Neither is ever stored in the database.
- A key alias names a project and location (`batchdb.secrets.resolve_vertex_target`), so a
  lane (provider, key alias, model) is a (project, location, model): the unit Vertex's quotas
  are counted in.
- Vertex's pay-as-you-go 429 ("Resource exhausted. Please try again later.") says neither which
  limit nor when to come back: RATE_LIMITED with no retry_after.

SDK retries are off, as for Gemini: one attempt is one HTTP request. The API version is ``v1``
(google-genai's own default for Vertex is ``v1beta1``).
"""

from __future__ import annotations

import threading
from typing import Any

import google.auth
import google.auth.exceptions
import google.oauth2.credentials
from google import genai

from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.gemini import GenAIProvider, http_options
from batchdb.secrets import MissingSecret, VertexTarget, alias_env, redact, resolve_key

API_VERSION = "v1"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)


class VertexProvider(GenAIProvider):
    name = "vertex"
    vendor = "Vertex AI"
    credential = "credentials"

    def __init__(self, *, target: VertexTarget, credentials: Any, timeout: float = 120.0) -> None:
        """`credentials`: google.auth credentials (`vertex_credentials` finds the worker's)."""
        self._target = target
        token = getattr(credentials, "token", None)
        client = genai.Client(
            vertexai=True,
            project=target.project,
            location=target.location,
            credentials=credentials,
            http_options=http_options(target.base_url, timeout, api_version=API_VERSION),
        )
        super().__init__(client, base_url=target.host, secret=token if isinstance(token, str) else None)

    async def complete(self, request: ChatRequest) -> ChatResponse:
        try:
            return await super().complete(request)
        except google.auth.exceptions.GoogleAuthError as exc:
            # Getting or refreshing the access token failed before any call to Vertex.
            raise self._auth_failure(exc) from None

    def _auth_failure(self, exc: google.auth.exceptions.GoogleAuthError) -> ProviderError:
        """A token endpoint that could not be reached is transient; refused credentials (a revoked
        or deleted service-account key) fail every row of the lane alike, so its circuit opens."""
        text = redact(f"{type(exc).__name__}: {exc}", self._secret)[:600]
        message = f"Vertex AI credentials for project {self._target.project}: {text}"
        if isinstance(exc, google.auth.exceptions.TransportError) or getattr(exc, "retryable", False):
            return ProviderError(ErrorKind.TRANSIENT, message)
        return ProviderError(ErrorKind.UNAVAILABLE, message)

    def _model_path(self, model: str) -> str:
        if model.startswith("projects/"):
            return model
        publisher_model = model if model.startswith("publishers/") else f"publishers/google/models/{model}"
        return f"projects/{self._target.project}/locations/{self._target.location}/{publisher_model}"


def vertex_credentials(key_alias: str = "default") -> Any:
    """The credentials a worker calls Vertex AI with under `key_alias`.

    An access token given for the alias (``BATCHDB_KEY_VERTEX_<ALIAS>`` or the secrets file's
    ``[vertex]`` table) wins; otherwise Application Default Credentials. Raises
    `ProviderError(QUOTA_EXHAUSTED)` naming what was checked when there are none, as a missing
    API key does: the worker pauses the job with that message.
    """
    try:
        token = resolve_key("vertex", key_alias)
    except MissingSecret:
        token = None
    if token is not None:
        return google.oauth2.credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
    return _application_default_credentials(key_alias)


_adc_lock = threading.Lock()
_adc: Any = None
_adc_missing: str | None = None


def _application_default_credentials(key_alias: str) -> Any:
    """The process's Application Default Credentials, looked up once: off Google Cloud the lookup
    probes the metadata server for seconds, and a worker asks again for every lane it cannot serve.
    One credentials object serves every alias (google-auth refreshes it under a lock)."""
    global _adc, _adc_missing
    with _adc_lock:
        if _adc is None and _adc_missing is None:
            try:
                _adc, _ = google.auth.default(scopes=list(SCOPES))
            except google.auth.exceptions.DefaultCredentialsError as exc:
                _adc_missing = str(exc)
        if _adc_missing is not None:
            raise ProviderError(
                ErrorKind.QUOTA_EXHAUSTED,
                f"provider vertex: no credentials for key alias {key_alias!r}: no access token in "
                f"{alias_env('KEY', 'vertex', key_alias)} or the secrets file, and no Application Default "
                f"Credentials ({_adc_missing}); restart the worker once they are in place",
            )
        return _adc
