"""The Vertex AI adapter through google-genai (``vertexai=True``) against the simulator: usage and
cost, every error class, how a key alias names a project and location, and where credentials come
from (an access token given to the worker, or Application Default Credentials refreshed from their
token endpoint, here a local one standing in for Google's)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import pandas as pd
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from provider_calls import call

import batchdb
from batchdb.providers import build_provider, lane_endpoint, vertex
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.vertex import VertexProvider
from batchdb.secrets import VertexTarget, resolve_vertex_target
from batchdb.simulator import Distribution, LimitRule, Outage, SimulatorProcess
from batchdb.tokens import count_text

ConfigureSimulator = Callable[..., SimulatorProcess]
MODEL = "gemini-2.5-flash"
PROJECT, LOCATION = "acme-research", "us-central1"
TOKEN = "ya29.vertex-test-token-0123"


@pytest.fixture(autouse=True)
def no_google_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No project, credentials or gcloud configuration from the machine, and no metadata-server probe."""
    for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_LOCATION", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("NO_GCE_CHECK", "True")
    # The process looks Application Default Credentials up once; each test starts before that.
    monkeypatch.setattr(vertex, "_adc", None)
    monkeypatch.setattr(vertex, "_adc_missing", None)


def request(text: str = "Acme beats third-quarter estimates", system: str = "You label headlines.") -> ChatRequest:
    return ChatRequest(messages=[{"role": "system", "content": system}, {"role": "user", "content": text}], model=MODEL)


def provider_on(sim: SimulatorProcess, token: str = TOKEN) -> VertexProvider:
    credentials = google.oauth2.credentials.Credentials(token=token)  # type: ignore[no-untyped-call]
    return VertexProvider(target=VertexTarget(PROJECT, LOCATION, sim.base_url), credentials=credentials, timeout=10)


def cost(conn: psycopg.Connection, answer: ChatResponse) -> Decimal:
    """What batchdb charges for the answer: the seeded Vertex price through batchdb.call_cost_usd."""
    row = conn.execute(
        "SELECT batchdb.call_cost_usd(input_per_mtok, cached_input_per_mtok, output_per_mtok, batch_discount, "
        "%s, %s, %s, false) AS usd FROM batchdb.prices WHERE provider = 'vertex' AND model = %s",
        (answer.prompt_tokens, answer.cached_tokens, answer.completion_tokens, MODEL),
    ).fetchone()
    assert row is not None, "no Vertex price for the model"
    return Decimal(row["usd"])


def test_success_with_usage_cached_tokens_and_cost(simulator: ConfigureSimulator, conn: psycopg.Connection) -> None:
    sim = simulator(output_tokens=Distribution(kind="fixed", value=40))
    shared = "Background for every headline. " * 500  # about 3,000 tokens: Gemini 2.5's implicit cache hits
    first, second = call(provider_on(sim), request("first headline", shared), request("second headline", shared))
    assert isinstance(first, ChatResponse) and isinstance(second, ChatResponse)
    assert first.prompt_tokens == count_text(shared) + count_text("first headline")
    assert first.completion_tokens == count_text(first.text) == 40 and first.finish_reason == "stop"
    assert first.cached_tokens == 0 and 2048 <= second.cached_tokens < second.prompt_tokens
    assert first.model == MODEL and first.rate_limit_headers == {}  # Vertex sends no rate-limit headers
    # Vertex's list price for Gemini 2.5 Flash: $0.30 / 1M input, $0.03 cached, $2.50 output.
    fresh = second.prompt_tokens - second.cached_tokens
    expected = (fresh * Decimal("0.30") + second.cached_tokens * Decimal("0.03") + 40 * Decimal("2.50")) / 10**6
    assert cost(conn, second) == expected
    assert cost(conn, first) == (first.prompt_tokens * Decimal("0.30") + 40 * Decimal("2.50")) / 10**6


def test_resource_exhausted_429_is_rate_limited_without_a_retry_delay(simulator: ConfigureSimulator) -> None:
    """Vertex's 429 names no quota and no RetryInfo: the lane's pacer decides when to come back."""
    sim = simulator(limits=(LimitRule(key=f"{PROJECT}/{LOCATION}", rpm=1),), burst_window_s=60)
    ok, limited = call(provider_on(sim), request(), request())
    assert isinstance(ok, ChatResponse)
    assert isinstance(limited, ProviderError) and limited.kind is ErrorKind.RATE_LIMITED and limited.retryable
    assert limited.status_code == 429 and limited.retry_after is None and not limited.lane_level
    assert limited.message.startswith("Vertex AI 429 RESOURCE_EXHAUSTED: Resource exhausted. Please try again later.")
    url = f"{sim.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}/publishers/google/models/{MODEL}:generateContent"
    assert f"(at {url})" in limited.message


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_transient_and_lane_level(simulator: ConfigureSimulator, status: int) -> None:
    sim = simulator(outage=Outage(status=status))
    [error] = call(provider_on(sim), request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.TRANSIENT
    assert error.status_code == status and error.lane_level
    assert sim.stats(series=False)["totals"]["requests"] == 1  # SDK retries are off


def test_invalid_argument_400_fails_the_row(simulator: ConfigureSimulator) -> None:
    sim = simulator(context_window=50)
    [error] = call(provider_on(sim), request("word " * 200))
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.PERMANENT and error.status_code == 400
    assert "INVALID_ARGUMENT" in error.message and not error.lane_level


def test_refused_token_401_opens_the_lane_and_is_never_echoed(simulator: ConfigureSimulator) -> None:
    sim = simulator(api_keys=(TOKEN,))
    [error] = call(provider_on(sim, token="ya29.expired-secret-token"), request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 401
    assert error.lane_level
    assert error.message.startswith("Vertex AI refused the credentials (401). Vertex AI 401 UNAUTHENTICATED"), error
    assert "expired-secret-token" not in str(error)


def test_an_unknown_model_is_unavailable(simulator: ConfigureSimulator) -> None:
    sim = simulator(models=("gemini-2.0-flash",))
    [error] = call(provider_on(sim), request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.status_code == 404


# -- configuration: the key alias names a project and location --------------------------------------


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("acme-research/us-central1", VertexTarget("acme-research", "us-central1")),
        ("projects/acme-research/locations/global", VertexTarget("acme-research", "global")),
        (
            "http://127.0.0.1:8000/v1/projects/p1/locations/europe-west4",
            VertexTarget("p1", "europe-west4", "http://127.0.0.1:8000"),
        ),
        (
            "https://proxy.example/vertex/projects/p2/locations/l2/",
            VertexTarget("p2", "l2", "https://proxy.example/vertex"),
        ),
    ],
)
def test_an_alias_endpoint_names_the_project_and_location(
    monkeypatch: pytest.MonkeyPatch, value: str, target: VertexTarget
) -> None:
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_TEAM_B", value)
    assert resolve_vertex_target("team-b") == target


def test_the_default_alias_reads_googles_variables_and_a_missing_project_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ProviderError) as caught:
        lane_endpoint("vertex")
    assert caught.value.kind is ErrorKind.QUOTA_EXHAUSTED
    for name in ("BATCHDB_ENDPOINT_VERTEX_DEFAULT", "GOOGLE_CLOUD_PROJECT"):
        assert name in caught.value.message
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "acme-research")
    assert lane_endpoint("vertex") == "https://aiplatform.googleapis.com/v1/projects/acme-research/locations/global"
    monkeypatch.setenv("GOOGLE_CLOUD_LOCATION", "europe-west4")
    assert lane_endpoint("vertex") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/acme-research/locations/europe-west4"
    )
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_DEFAULT", "other/us-east5")
    assert resolve_vertex_target() == VertexTarget("other", "us-east5")
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_DEFAULT", "not a project")
    with pytest.raises(ProviderError, match="must be PROJECT/LOCATION"):
        lane_endpoint("vertex")


def test_build_provider_with_an_access_token_for_the_alias(
    simulator: ConfigureSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = simulator(api_keys=(TOKEN,))
    endpoint = f"{sim.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}"
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_TEAM_B", endpoint)
    monkeypatch.setenv("BATCHDB_KEY_VERTEX_TEAM_B", TOKEN)
    assert lane_endpoint("vertex", key_alias="team-b") == endpoint
    [answer] = call(build_provider("vertex", key_alias="team-b", timeout=10), request())
    assert isinstance(answer, ChatResponse) and answer.text
    [row] = sim.stats(series=False)["by_key_model"]
    assert row["key"] == f"{PROJECT}/{LOCATION}"


def test_no_credentials_at_all_pauses_like_a_missing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", PROJECT)
    lookups: list[object] = []
    real_default = vertex.google.auth.default
    monkeypatch.setattr(vertex.google.auth, "default", lambda **kw: lookups.append(kw) or real_default(**kw))
    for _ in range(2):
        with pytest.raises(ProviderError) as caught:
            build_provider("vertex")
        assert caught.value.kind is ErrorKind.QUOTA_EXHAUSTED
        assert "BATCHDB_KEY_VERTEX_DEFAULT" in caught.value.message
        assert "Application Default Credentials" in caught.value.message
    assert len(lookups) == 1  # looked up once per process: off Google Cloud a lookup takes seconds


# -- Application Default Credentials, refreshed from a local token endpoint ----------------------------


class TokenEndpoint:
    """An OAuth token endpoint on localhost: hands out `token` for any refresh token, or refuses."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.refuse = False
        self.refreshes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.refreshes += 1
                if outer.refuse:
                    status, body = 400, {"error": "invalid_grant", "error_description": "Token has been revoked."}
                else:
                    status, body = 200, {"access_token": outer.token, "expires_in": 3600, "token_type": "Bearer"}
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def token_endpoint() -> Iterator[TokenEndpoint]:
    endpoint = TokenEndpoint("ya29.refreshed-by-adc")
    yield endpoint
    endpoint.close()


def service_account_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token_uri: str) -> None:
    """GOOGLE_APPLICATION_CREDENTIALS naming a service-account key file whose token endpoint is
    `token_uri` (a fresh RSA key: the token request is a JWT signed with it, as with Google's)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = tmp_path / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "0123456789abcdef",
                "private_key": pem.decode(),
                "client_email": f"batchdb-worker@{PROJECT}.iam.gserviceaccount.com",
                "client_id": "1234567890",
                "token_uri": token_uri,
            }
        )
    )
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))


def test_application_default_credentials_are_refreshed_and_sent_as_the_bearer(
    simulator: ConfigureSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token_endpoint: TokenEndpoint
) -> None:
    sim = simulator(api_keys=(token_endpoint.token,))
    service_account_file(tmp_path, monkeypatch, token_endpoint.url)
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_DEFAULT", f"{sim.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}")
    answers = call(build_provider("vertex", timeout=10), request(), request())
    assert all(isinstance(a, ChatResponse) for a in answers), answers
    assert token_endpoint.refreshes == 1  # the token is kept until it expires


def test_credentials_the_token_endpoint_refuses_open_the_lane(
    simulator: ConfigureSimulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token_endpoint: TokenEndpoint
) -> None:
    sim = simulator()
    token_endpoint.refuse = True
    service_account_file(tmp_path, monkeypatch, token_endpoint.url)
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_DEFAULT", f"{sim.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}")
    [error] = call(build_provider("vertex", timeout=10), request())
    assert isinstance(error, ProviderError) and error.kind is ErrorKind.UNAVAILABLE and error.lane_level
    assert error.message.startswith(f"Vertex AI credentials for project {PROJECT}: RefreshError"), error.message
    assert "PRIVATE KEY" not in error.message
    assert sim.stats(series=False)["totals"]["requests"] == 0


# -- end to end: a job through a worker ------------------------------------------------------------


def test_a_vertex_job_runs_through_a_worker_on_its_project_lane(
    simulator: ConfigureSimulator,
    monkeypatch: pytest.MonkeyPatch,
    dsn: str,
    conn: psycopg.Connection,
    drain: Callable[..., Any],
) -> None:
    """Submitted with provider 'vertex', answered by the simulator's Vertex route with the token the
    worker holds, recorded with usage and the Vertex price, and run on the lane of the alias's project."""
    sim = simulator(api_keys=(TOKEN,), output_tokens=Distribution(kind="fixed", value=12))
    endpoint = f"{sim.base_url}/v1/projects/{PROJECT}/locations/{LOCATION}"
    monkeypatch.setenv("BATCHDB_ENDPOINT_VERTEX_DEFAULT", endpoint)
    monkeypatch.setenv("BATCHDB_KEY_VERTEX_DEFAULT", TOKEN)
    frame = pd.DataFrame({"text": [f"Headline {i}: Acme raises guidance" for i in range(12)]})
    job = batchdb.submit(frame, prompt="Label: {text}", model=MODEL, provider="vertex", max_tokens=50, dsn=dsn)
    drain()
    status = job.status()
    assert (status.status, status.n_succeeded) == ("completed", 12), status
    served = sim.stats(series=False)
    [row] = served["by_key_model"]
    assert (row["key"], row["model"], row["accepted"]) == (f"{PROJECT}/{LOCATION}", MODEL, 12)
    assert status.prompt_tokens == served["totals"]["prompt_tokens"] and status.completion_tokens == 12 * 12
    expected = (status.prompt_tokens * Decimal("0.30") + status.completion_tokens * Decimal("2.50")) / 10**6
    assert status.cost_usd == expected
    results = job.results()
    assert results["response"].str.len().gt(0).all() and set(results["status"]) == {"succeeded"}
    lanes = conn.execute("SELECT lanes FROM batchdb.workers").fetchall()
    assert any({"provider": "vertex", "key_alias": "default", "endpoint": endpoint} in r["lanes"] for r in lanes), lanes
