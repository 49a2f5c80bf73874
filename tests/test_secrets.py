"""No API key in the database, logs, exceptions, dashboard or Dagster metadata.

Recognisable fake keys (`CANARIES`) go where batchdb reads them (the providers' standard
variables, and ``BATCHDB_KEY_<PROVIDER>_REFUSED`` for the alias ``refused``). Real jobs then run
through a real in-process worker against the provider simulator, which accepts the OpenAI, Azure
and Gemini keys and refuses the two ``refused`` ones: answered rows, a refused key (401 /
API_KEY_INVALID: the lane's circuit opens and the job waits, its reason naming the refusal), rows
the provider rejects (context too long: failed) and rows hit by 500s and dropped connections (dead).
Afterwards every place a key could end up is scanned for each key, its tail and the marker "CANARY":

1. every table and view of every non-system schema, dumped as text;
2. every log record of every logger at DEBUG (openai, httpx2, google_genai, aiohttp, psycopg,
   workers, batchdb ...), taken before any handler's filter could rewrite it;
3. the rows' errors, the jobs' status reasons, and str / repr / traceback of every exception in
   the chain (suppressed contexts included) that the provider adapters raise with a refused key
   or an unreachable endpoint, plus `MissingSecret` for broken secrets files holding a key;
4. every page of the Streamlit dashboard (every job's detail page, its Parquet output section
   included), rendered with AppTest: every node of the element tree and every dataframe;
5. a Dagster run materializing `llm_batch_asset`s with the keys in the environment: the
   materialization and asset-check metadata, the run's event log (Python logs of the worker,
   openai and httpx routed into it), every file of the Dagster instance (event-log database,
   captured compute logs) and the Parquet output.

Every scan has a self-check that plants a key in the place scanned and asserts the scan finds it.

Tolerated: the provider's own masked form of a refused OpenAI key, "sk-*****" + its last four
characters (OpenAI's 401 message, which the simulator reproduces); the tails scanned for are
eight characters long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pyarrow.parquet as pq
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

import batchdb
from batchdb.dashboard.run import APP as dashboard_app
from batchdb.providers import build_provider
from batchdb.providers.base import ChatRequest, ErrorKind, ProviderError
from batchdb.providers.gemini import GeminiProvider
from batchdb.providers.openai import OpenAIProvider
from batchdb.secrets import MissingSecret, resolve_key
from batchdb.simulator.config import Distribution, ErrorRates, SimulatorConfig
from batchdb.simulator.process import SimulatorProcess, start_simulator
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

OPENAI_MODEL = "gpt-4o-mini"
GEMINI_MODEL = "gemini-2.5-flash"
CONTEXT_WINDOW = 150  # tokens: the "long" rows below exceed it, the short ones do not

# Environment variable -> fake key. Tails use letters outside hex so no digest or uuid can match them.
CANARIES = {
    "OPENAI_API_KEY": "sk-CANARY-openai-Qz7wXp2Lk9Vb",
    "BATCHDB_KEY_OPENAI_REFUSED": "sk-CANARY-refused-Hy3uRn8Tm5Wc",
    "AZURE_OPENAI_API_KEY": "azCANARY-azure-Wm4Gh7Jt2Pq6",
    "BATCHDB_KEY_AZURE_REFUSED": "azCANARY-azrefused-Kd8sYv3Fr7Lx",
    "GEMINI_API_KEY": "AIzaSyCANARY-gemini-Rt5yHn3Mj8Ks",
    "BATCHDB_KEY_GEMINI_REFUSED": "AIzaSyCANARY-gmrefused-Vg6kLq2Zx9Np",
}
ACCEPTED = (CANARIES["OPENAI_API_KEY"], CANARIES["AZURE_OPENAI_API_KEY"], CANARIES["GEMINI_API_KEY"])
MARKER = "CANARY"
NEEDLES = (MARKER, *CANARIES.values(), *(key[-8:] for key in CANARIES.values()))

# Everything that may hold a key or endpoint from the machine running the tests.
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
# Loggers turned to DEBUG while a scenario runs (the root logger is too: every other logger inherits it).
_LOGGERS = (
    "openai",
    "httpx",
    "httpx2",
    "httpcore",
    "google_genai",
    "google",
    "aiohttp",
    "asyncio",
    "psycopg",
    "batchdb",
    "dagster",
    "streamlit",
    "urllib3",
)
FAST_RETRY = RetryPolicy(base_seconds=0.05, max_seconds=0.2)


# -- the scanner -----------------------------------------------------------------------------------


def leaks(text: str) -> list[str]:
    """The key material found in `text`."""
    return [needle for needle in NEEDLES if needle in text]


def assert_no_key(where: str, text: str) -> None:
    found = leaks(text)
    if found:
        at = text.find(found[0])
        raise AssertionError(f"API key material {found} in {where}: ...{text[max(0, at - 300) : at + 200]!r}...")


def exception_text(exc: BaseException) -> str:
    """str, repr and traceback of `exc` and of every exception chained to it, suppressed or not."""
    parts: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        parts += [
            str(current),
            repr(current),
            "".join(traceback.format_exception(current)),
            str(getattr(current, "message", "")),
        ]
        pending += [current.__cause__, current.__context__]
    return "\n".join(parts)


class LogRecorder(logging.Handler):
    """Renders every record when it is emitted: message, all its attributes, traceback and stack."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.loggers: Counter[str] = Counter()
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        parts = [record.name, record.levelname]
        try:
            parts.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed record is still scanned
            parts.append(f"{record.msg!r} % {record.args!r}")
        parts.append(repr(record.__dict__))
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(exception_text(record.exc_info[1]))
        parts += [record.exc_text or "", record.stack_info or ""]
        with self._lock_lines:
            self.lines.append("\n".join(parts))
            self.loggers[record.name] += 1

    def text(self) -> str:
        with self._lock_lines:
            return "\n".join(self.lines)


@contextlib.contextmanager
def captured_logs() -> Iterator[LogRecorder]:
    """Every log record of every logger, at DEBUG, seen first (before another handler's filter rewrites it)."""
    recorder = LogRecorder()
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in _LOGGERS}
    saved_root = root.level
    root.handlers.insert(0, recorder)
    root.setLevel(logging.DEBUG)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    # Loggers that do not propagate to the root (streamlit's ...) get the recorder themselves.
    detached = [
        lg
        for lg in list(logging.root.manager.loggerDict.values())
        if isinstance(lg, logging.Logger) and not lg.propagate
    ]
    for lg in detached:
        lg.addHandler(recorder)
    try:
        yield recorder
    finally:
        for lg in detached:
            lg.removeHandler(recorder)
        root.removeHandler(recorder)
        root.setLevel(saved_root)
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_the_scanner_finds_every_form_of_a_key_and_tolerates_the_providers_mask() -> None:
    for key in CANARIES.values():
        assert leaks(f"x {key} y") and leaks(f"Bearer ...{key[-8:]}") and leaks(key[:12])
        assert not leaks(f"Incorrect API key provided: {key[:3]}*****{key[-4:]}.")
    try:
        try:
            raise RuntimeError(f"Authorization: Bearer {CANARIES['OPENAI_API_KEY']}")
        except RuntimeError:
            raise ProviderError(ErrorKind.PERMANENT, "clean message") from None
    except ProviderError as exc:
        assert not leaks(str(exc)) and leaks(exception_text(exc))  # found in the suppressed context
    with captured_logs() as logs:
        logging.getLogger("httpx2").debug("headers: %s", {"authorization": f"Bearer {CANARIES['OPENAI_API_KEY']}"})
        logging.getLogger("streamlit.runtime").debug("x-goog-api-key=%s", CANARIES["GEMINI_API_KEY"])
        try:
            raise ValueError(CANARIES["AZURE_OPENAI_API_KEY"])
        except ValueError:
            logging.getLogger("batchdb.workers.worker").exception("boom")
    assert logs.loggers["httpx2"] == 1 and logs.loggers["batchdb.workers.worker"] == 1
    text = logs.text()
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "AZURE_OPENAI_API_KEY"):
        assert CANARIES[name] in text, name
    with pytest.raises(AssertionError, match="API key material"):
        assert_no_key("the logs", text)


# -- the run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorProcess]:
    config = SimulatorConfig(
        seed=11,
        api_keys=ACCEPTED,
        latency_s=Distribution(kind="fixed", value=0.01),
        output_tokens=Distribution(kind="uniform", low=4, high=8),
        context_windows={OPENAI_MODEL: CONTEXT_WINDOW, GEMINI_MODEL: CONTEXT_WINDOW},
    )
    with start_simulator(config) as sim:
        yield sim


@pytest.fixture(scope="module")
def key_env(simulator: SimulatorProcess) -> Iterator[None]:
    """The canary keys where batchdb reads them, endpoints at the simulator, nothing from the machine."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name in _KEY_ENVS or name.startswith(("BATCHDB_KEY_", "BATCHDB_ENDPOINT_")):
                mp.delenv(name)
        for name, key in CANARIES.items():
            mp.setenv(name, key)
        mp.setenv("OPENAI_BASE_URL", simulator.openai_base_url)
        mp.setenv("BATCHDB_ENDPOINT_OPENAI_REFUSED", simulator.openai_base_url)
        mp.setenv("AZURE_OPENAI_ENDPOINT", simulator.azure_endpoint)
        mp.setenv("BATCHDB_ENDPOINT_AZURE_REFUSED", simulator.azure_endpoint)
        mp.setenv("GEMINI_BASE_URL", simulator.gemini_base_url)
        mp.setenv("BATCHDB_ENDPOINT_GEMINI_REFUSED", simulator.gemini_base_url)
        yield


def rows(n_short: int, n_long: int = 0, tag: str = "r") -> pd.DataFrame:
    texts = [f"Acme {tag}{i} shares rise {i} percent after results" for i in range(n_short)]
    texts += [f"Long {tag}{i}: " + " ".join(f"word{j}" for j in range(300)) for i in range(n_long)]
    return pd.DataFrame({"id": [f"{tag}-{i:02d}" for i in range(len(texts))], "text": texts})


REFUSED_JOBS = ("openai-refused-key", "gemini-refused-key")
WAITING = "waiting: provider unavailable"


def settle(dsn: str, jobs: dict[str, int], timeout: float = 120) -> None:
    """Until every job is finished, except the refused-key ones, which wait behind their open circuit
    (a worker never runs out of work while a circuit is open, so `exit_when_idle` cannot be used)."""
    deadline = time.monotonic() + timeout
    for name, job_id in jobs.items():
        job = batchdb.get_job(job_id, dsn=dsn)
        if name not in REFUSED_JOBS:
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
            continue
        while not ((progress := job.status()).status_reason or "").startswith(WAITING):
            assert progress.status == "running" and time.monotonic() < deadline, progress
            time.sleep(0.1)


@dataclass
class Scenario:
    dsn: str
    jobs: dict[str, int]
    logs: LogRecorder
    outputs: Path


def run_jobs(dsn: str, sim: SimulatorProcess) -> dict[str, int]:
    def submit(name: str, data: pd.DataFrame, **options: Any) -> int:
        options.setdefault("model", OPENAI_MODEL)
        return batchdb.submit(
            data,
            prompt="Classify: {text}",
            id_column="id",
            name=name,
            owner="secrets-test",
            max_tokens=10,
            dsn=dsn,
            **options,
        ).id

    jobs = {
        "openai-ok": submit("openai-ok", rows(6, tag="oa"), provider="openai"),
        "openai-rejected-rows": submit("openai-rejected-rows", rows(3, 3, tag="or"), provider="openai"),
        "openai-refused-key": submit("openai-refused-key", rows(4, tag="ok"), provider="openai", key_alias="refused"),
        "azure-ok": submit("azure-ok", rows(4, tag="az"), provider="azure"),
        "gemini-ok": submit("gemini-ok", rows(4, 2, tag="gm"), provider="gemini", model=GEMINI_MODEL),
        "gemini-refused-key": submit(
            "gemini-refused-key", rows(4, tag="gk"), provider="gemini", model=GEMINI_MODEL, key_alias="refused"
        ),
    }
    with running_worker(dsn):
        settle(dsn, jobs)
    # Every call now answers 500 or drops the connection: with one attempt each, rows die.
    sim.set_config(error_rates=ErrorRates(http_500=0.5, connection_reset=0.5))
    try:
        dead = {
            "openai-dead": submit("openai-dead", rows(4, tag="od"), provider="openai", max_attempts=1),
            "gemini-dead": submit(
                "gemini-dead", rows(4, tag="gd"), provider="gemini", model=GEMINI_MODEL, max_attempts=1
            ),
        }
        with running_worker(dsn):
            settle(dsn, dead)
        jobs.update(dead)
    finally:
        sim.set_config(error_rates=ErrorRates())
    return jobs


@pytest.fixture(scope="module")
def scenario(
    admin_dsn: str,
    template_db: str,
    simulator: SimulatorProcess,
    key_env: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Scenario]:
    name = f"batchdb_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    dsn = make_conninfo(admin_dsn, dbname=name)
    outputs = tmp_path_factory.mktemp("outputs")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BATCHDB_DSN", dsn)  # the dashboard's database
            mp.setenv("BATCHDB_DASHBOARD_OUTPUTS", str(outputs))
            with captured_logs() as logs:
                jobs = run_jobs(dsn, simulator)
                for job_id in jobs.values():
                    batchdb.get_job(job_id, dsn=dsn).to_parquet(outputs / f"job-{job_id}.parquet")
            yield Scenario(dsn, jobs, logs, outputs)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_run_had_every_outcome(scenario: Scenario) -> None:
    """Not vacuous: answers, a refused key per provider, rejected rows and dead rows all happened."""
    s = {name: batchdb.get_job(job_id, dsn=scenario.dsn).status() for name, job_id in scenario.jobs.items()}
    counts = {name: (p.status, p.n_succeeded, p.n_failed, p.n_dead) for name, p in s.items()}
    assert counts == {
        "openai-ok": ("completed", 6, 0, 0),
        "openai-rejected-rows": ("completed", 3, 3, 0),
        "openai-refused-key": ("running", 0, 0, 0),
        "azure-ok": ("completed", 4, 0, 0),
        "gemini-ok": ("completed", 4, 2, 0),
        "gemini-refused-key": ("running", 0, 0, 0),
        "openai-dead": ("completed", 0, 0, 4),
        "gemini-dead": ("completed", 0, 0, 4),
    }, counts
    # A refused key opens the lane's circuit: the job waits (running) with the refusal as its reason.
    openai_reason, gemini_reason = (s[name].status_reason or "" for name in REFUSED_JOBS)
    assert openai_reason.startswith(WAITING) and "OpenAI refused the API key (401 invalid_api_key)" in openai_reason
    assert gemini_reason.startswith(WAITING) and "Gemini refused the API key (400 API_KEY_INVALID)" in gemini_reason


# -- 1. the database -------------------------------------------------------------------------------


def dump_database(conn: psycopg.Connection) -> dict[str, str]:
    """Every table, partition, view and materialized view outside the system schemas, as text."""
    relations = conn.execute("""
        SELECT n.nspname AS schema, c.relname AS name
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
           AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
         ORDER BY 1, 2""").fetchall()
    dumps = {}
    for rel in relations:
        statement = sql.SQL("SELECT coalesce(string_agg(t::text, E'\\n'), '') AS d FROM {}.{} t").format(
            sql.Identifier(rel["schema"]), sql.Identifier(rel["name"])
        )
        dumps[f"{rel['schema']}.{rel['name']}"] = conn.execute(statement).fetchone()["d"]
    return dumps


def test_no_key_in_any_table_or_view(scenario: Scenario) -> None:
    with psycopg.connect(scenario.dsn, row_factory=dict_row) as conn:
        dumps = dump_database(conn)
        for relation, text in dumps.items():
            assert_no_key(f"table/view {relation}", text)
        # Not vacuous: the dump holds the rows, their errors and the jobs' reasons.
        assert {"batchdb.jobs", "batchdb.requests", "batchdb.job_progress", "batchdb.rate_limits"} <= set(dumps)
        everything = "\n".join(dumps.values())
        for expected in (
            "openai-refused-key",
            "context_length_exceeded",
            "invalid_api_key",
            "refused the API key",
            "Acme oa3 shares",
        ):
            assert expected in everything, expected
        # Self-check, rolled back: a key planted in a row's error is found, in the table and its views.
        with conn.transaction(force_rollback=True):
            conn.execute(
                "UPDATE batchdb.requests SET error = error || %s WHERE id = "
                "(SELECT min(id) FROM batchdb.requests WHERE error IS NOT NULL)",
                (f" Bearer {CANARIES['OPENAI_API_KEY']}",),
            )
            planted = {rel for rel, text in dump_database(conn).items() if leaks(text)}
        assert "batchdb.requests" in planted, planted


# -- 2. the logs --------------------------------------------------------------------------------------


def test_no_key_in_any_log_record(scenario: Scenario) -> None:
    logs = scenario.logs
    assert_no_key("the log records", logs.text())
    # Not vacuous: the SDKs' and HTTP clients' debug records and the worker's own lines were captured.
    names = set(logs.loggers)
    assert any(n.startswith("openai") for n in names), names
    assert any(n.startswith(("httpx", "httpcore")) for n in names), names
    assert any(n.startswith("batchdb.workers") for n in names), names
    text = logs.text()
    assert "circuit openai/refused/gpt-4o-mini opened: OpenAI refused the API key" in text
    assert "invalid_api_key" in text and "API_KEY_INVALID" in text
    assert sum(logs.loggers.values()) > 100, logs.loggers
    # Self-check: the same capture finds a key that an SDK or HTTP-client logger emits. (The openai SDK's
    # own logger filter masks an "Authorization" entry of a headers dict, so the key goes in as text.)
    with captured_logs() as planted:
        logging.getLogger("openai._base_client").debug("HTTP Request: POST https://x/v1?key=%s", ACCEPTED[0])
        logging.getLogger("httpx2").debug("request headers: x-goog-api-key: %s", ACCEPTED[2])
    assert leaks(planted.text()) and planted.loggers == {"openai._base_client": 1, "httpx2": 1}


# -- 3. errors and exceptions ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def adapter_failures(sim: SimulatorProcess) -> dict[str, ProviderError]:
    """What the provider adapters raise with a refused key, and with a good key and no server."""
    nowhere = f"http://127.0.0.1:{closed_port()}"
    clients: dict[str, tuple[Callable[[], Any], str]] = {
        "openai, refused key": (lambda: build_provider("openai", key_alias="refused"), OPENAI_MODEL),
        "azure, refused key": (lambda: build_provider("azure", key_alias="refused"), OPENAI_MODEL),
        "gemini, refused key": (lambda: build_provider("gemini", key_alias="refused"), GEMINI_MODEL),
        "openai, unreachable": (
            lambda: OpenAIProvider(api_key=ACCEPTED[0], base_url=f"{nowhere}/v1", timeout=5),
            OPENAI_MODEL,
        ),
        "gemini, unreachable": (lambda: GeminiProvider(api_key=ACCEPTED[2], base_url=nowhere, timeout=5), GEMINI_MODEL),
    }
    raised: dict[str, ProviderError] = {}
    for what, (make, model) in clients.items():
        provider = make()
        try:
            await provider.complete(
                ChatRequest(messages=[{"role": "user", "content": "hello"}], model=model, max_tokens=5)
            )
        except ProviderError as exc:
            raised[what] = exc
        finally:
            await provider.aclose()
    return raised


def test_no_key_in_recorded_errors_or_raised_exceptions(
    scenario: Scenario, simulator: SimulatorProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the worker recorded: every row's error and every job's status reason.
    with psycopg.connect(scenario.dsn, row_factory=dict_row) as conn:
        errors = [r["error"] for r in conn.execute("SELECT error FROM batchdb.requests WHERE error IS NOT NULL")]
        reasons = [
            r["status_reason"]
            for r in conn.execute("SELECT status_reason FROM batchdb.jobs WHERE status_reason IS NOT NULL")
        ]
    assert len(errors) >= 13 and len(reasons) >= 2, (errors, reasons)
    for text in (*errors, *reasons):
        assert_no_key("a recorded error / status reason", text)

    # What the adapters raise, with everything chained to it.
    with captured_logs() as logs:
        raised = asyncio.run(adapter_failures(simulator))
    assert_no_key("the log records of those calls", logs.text())
    assert any(name.startswith("openai") for name in logs.loggers), logs.loggers
    assert set(raised) == {
        "openai, refused key",
        "azure, refused key",
        "gemini, refused key",
        "openai, unreachable",
        "gemini, unreachable",
    }
    for what, exc in raised.items():
        expected = ErrorKind.TRANSIENT if "unreachable" in what else ErrorKind.UNAVAILABLE
        assert exc.kind is expected, (what, exc.kind, exc.message)
        assert_no_key(f"the exception raised for {what}", exception_text(exc))
    # Not vacuous: the SDK's own exception (kept as the suppressed context) was scanned too.
    assert "AuthenticationError" in exception_text(raised["openai, refused key"])
    assert "invalid_api_key" in raised["openai, refused key"].message

    # Secrets files that hold a key but are broken: the error names the file and entry, never the key.
    monkeypatch.delenv("BATCHDB_KEY_OPENAI_FILE", raising=False)
    key = CANARIES["OPENAI_API_KEY"]
    files = {
        "truncated.json": f'{{"openai": {{"file": "{key}"',
        "broken.toml": f'[openai]\nfile = "{key}\n',
        "listed.json": f'{{"openai": {{"file": ["{key}"]}}}}',
        "nested.toml": f'[openai.file]\nkey = "{key}"\n',
    }
    for filename, content in files.items():
        path = tmp_path / filename
        path.write_text(content)
        monkeypatch.setenv("BATCHDB_SECRETS_FILE", str(path))
        with pytest.raises(MissingSecret) as caught:
            resolve_key("openai", "file")
        assert str(path) in str(caught.value)
        assert_no_key(f"MissingSecret for {filename}", exception_text(caught.value))


# -- 4. the dashboard -----------------------------------------------------------------------------------


APP = str(dashboard_app)  # batchdb/dashboard/app.py, as `batchdb dashboard` runs it


def render(page: str, **query: str) -> Any:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    for key, value in query.items():
        at.query_params[key] = value
    if page != "views/overview.py":
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def app_text(at: Any) -> str:
    """Every node of the rendered tree: its proto as text, its value, and every dataframe as CSV."""
    parts = []
    for node in at._tree:
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))
        try:
            value = node.value
        except Exception:  # noqa: BLE001 - blocks and some widgets have no value
            continue
        parts.append(value.to_csv() if isinstance(value, pd.DataFrame) else str(value))
    parts.append(repr(dict(at.query_params)))
    return "\n".join(parts)


def render_every_page(jobs: dict[str, int]) -> dict[str, str]:
    pages = {
        "overview": render("views/overview.py"),
        "jobs": render("views/jobs.py"),
        "providers": render("views/providers.py"),
        "cost": render("views/cost.py"),
    }
    for name, job_id in jobs.items():
        pages[f"job detail {name}"] = render("views/job_detail.py", job=str(job_id))
    return {name: app_text(at) for name, at in pages.items()}


def test_no_key_on_any_dashboard_page(scenario: Scenario) -> None:
    with captured_logs() as logs:
        shown = render_every_page(scenario.jobs)
    for page, text in shown.items():
        assert_no_key(f"dashboard page {page!r}", text)
    assert_no_key("the dashboard's log records", logs.text())
    # Not vacuous: the pages show the jobs, their errors and the paused jobs' reasons.
    assert "openai-refused-key" in shown["jobs"]
    assert "invalid_api_key" in shown["job detail openai-refused-key"]
    assert "refused the API key" in shown["job detail gemini-refused-key"]
    assert "context_length_exceeded" in shown["job detail openai-rejected-rows"]
    assert "Acme oa" in shown["job detail openai-ok"]  # sample prompts
    assert f"job-{scenario.jobs['openai-ok']}.parquet" in shown["job detail openai-ok"]  # the Parquet section

    # Self-check: a key planted in a job's name and in a row's error shows up where the scan looks.
    job_id = scenario.jobs["openai-rejected-rows"]
    with psycopg.connect(scenario.dsn, autocommit=True) as conn:
        before = conn.execute("SELECT name FROM batchdb.jobs WHERE id = %s", (job_id,)).fetchone()[0]
        row = conn.execute(
            "SELECT id, error FROM batchdb.requests WHERE job_id = %s AND error IS NOT NULL ORDER BY id LIMIT 1",
            (job_id,),
        ).fetchone()
        try:
            conn.execute("UPDATE batchdb.jobs SET name = name || %s WHERE id = %s", (f" {ACCEPTED[1]}", job_id))
            assert leaks(app_text(render("views/jobs.py")))
            conn.execute("UPDATE batchdb.jobs SET name = %s WHERE id = %s", (before, job_id))
            conn.execute(
                "UPDATE batchdb.requests SET error = error || %s WHERE job_id = %s AND id = %s",
                (f" key={ACCEPTED[2]}", job_id, row[0]),
            )
            assert ACCEPTED[2] in app_text(render("views/job_detail.py", job=str(job_id)))
        finally:
            conn.execute("UPDATE batchdb.jobs SET name = %s WHERE id = %s", (before, job_id))
            conn.execute(
                "UPDATE batchdb.requests SET error = %s WHERE job_id = %s AND id = %s", (row[1], job_id, row[0])
            )


# -- 5. Dagster -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_worker(dsn: str) -> Iterator[Worker]:
    """A real worker in a thread of this process (so its logs reach Dagster's managed loggers)."""
    worker = Worker(WorkerConfig(dsn=dsn, concurrency=8, poll_interval=0.2, retry=FAST_RETRY, shutdown_grace=5))
    box: dict[str, Any] = {}
    ready = threading.Event()

    def main() -> None:
        async def go() -> None:
            box["loop"] = asyncio.get_running_loop()
            ready.set()
            await worker.run()

        try:
            asyncio.run(go())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name="secrets-test-worker", daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield worker
    finally:
        if "loop" in box and thread.is_alive():
            box["loop"].call_soon_threadsafe(worker.stop)
        thread.join(60)
        assert not thread.is_alive(), "the worker did not stop"
        if "error" in box:
            raise box["error"]


def dagster_texts(result: Any, instance: Any, home: Path) -> dict[str, str]:
    """Metadata, the event log and the instance's files of one `materialize` run, as text per channel."""
    from dagster._serdes import serialize_value

    metadata = []
    for event in result.all_events:
        if event.is_step_materialization:
            materialization = event.step_materialization_data.materialization
            for key, value in materialization.metadata.items():
                metadata += [key, str(value), repr(value), str(getattr(value, "value", ""))]
            metadata.append(serialize_value(materialization))
    for evaluation in result.get_asset_check_evaluations():
        metadata += [f"{k}={v!r}" for k, v in evaluation.metadata.items()]
        metadata.append(serialize_value(evaluation))
    events = []
    for entry in instance.all_logs(result.run_id):
        events += [entry.user_message or "", str(entry.dagster_event or ""), serialize_value(entry)]
    files, compute_logs = [], []
    for path in sorted(p for p in home.rglob("*") if p.is_file()):
        text = path.read_bytes().decode("utf-8", errors="replace")
        files.append(f"== {path}\n{text}")
        if path.suffix in (".out", ".err", ".complete") or "compute_logs" in path.parts:
            compute_logs.append(f"== {path}\n{text}")
    return {
        "metadata": "\n".join(metadata),
        "event log": "\n".join(events),
        "instance files": "\n".join(files),
        "captured compute logs": "\n".join(compute_logs),
    }


def refused_key_resource(logged: Callable[[], bool]) -> type:
    """A `BatchDBResource` whose wait, once its job waits behind the refused key's open circuit (what a
    worker's first call brings about) and the worker has logged it (`logged()`: the record is written
    just after the commit the job's status shows, and must fall inside the step to reach its event
    log), gives up after a moment: the resource's timeout path, with its warning and its failure
    naming the reason, without a fixed wait that a slow machine could outlast."""
    from batchdb.dagster import BatchDBResource

    class RefusedKeyResource(BatchDBResource):
        def wait(self, context: Any, job: batchdb.Job, **options: Any) -> batchdb.JobProgress:
            deadline = time.monotonic() + 120
            while not (job.status().waiting_for_provider and logged()):
                assert time.monotonic() < deadline, f"job {job.id} never waited for its provider"
                time.sleep(0.1)
            return super().wait(context, job, timeout=0.5)

    return RefusedKeyResource


def test_no_key_in_dagster_metadata_event_log_or_captured_logs(dsn: str, key_env: None, tmp_path: Path) -> None:
    import dagster as dg

    from batchdb.dagster import BatchDBResource, llm_batch_asset

    partitions = dg.StaticPartitionsDefinition(["day-1"])
    recorded: list[LogRecorder] = []  # the test's log capture, once it starts
    RefusedKeyResource = refused_key_resource(
        lambda: "circuit openai/refused/gpt-4o-mini opened" in (recorded[0].text() if recorded else "")
    )

    @dg.asset(partitions_def=partitions)
    def items() -> pd.DataFrame:
        print("items for day-1")  # something on stdout for the compute-log capture
        return rows(5, 2, tag="dg")

    answers = llm_batch_asset(
        name="answers", source=items, model=OPENAI_MODEL, prompt="Classify: {text}", id_column="id", max_tokens=10
    )
    refused = llm_batch_asset(
        name="refused_answers",
        source=items,
        model=OPENAI_MODEL,
        prompt="Classify: {text}",
        id_column="id",
        max_tokens=10,
        key_alias="refused",
        resource_key="batchdb_refused",
    )
    home = tmp_path / "dagster_home"
    home.mkdir()
    managed = ["batchdb", "openai", "httpx2", "httpx", "google_genai"]
    instance = dg.DagsterInstance.local_temp(
        str(home), overrides={"python_logs": {"managed_python_loggers": managed, "python_log_level": "DEBUG"}}
    )
    output_root = tmp_path / "out"
    resources = {
        "batchdb": BatchDBResource(dsn=dsn, output_root=str(output_root), poll_interval=0.1, timeout=60),
        "batchdb_refused": RefusedKeyResource(dsn=dsn, output_root=str(output_root), poll_interval=0.1),
    }
    try:
        with captured_logs() as logs, running_worker(dsn):
            recorded.append(logs)
            result = dg.materialize(
                [items, answers, refused],
                partition_key="day-1",
                instance=instance,
                resources=resources,
                raise_on_error=False,
            )

        # What happened: one asset materialized with rows the provider rejected; the other's job waited
        # for its provider (the key refused) until the resource's timeout.
        (materialization,) = result.asset_materializations_for_node("answers")
        meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        assert (meta["rows_succeeded"], meta["rows_failed"]) == (5, 2)
        (failure,) = [e for e in result.all_events if e.is_step_failure]
        assert failure.step_key == "refused_answers"
        error = failure.step_failure_data.error.message
        assert "not finished after" in error and "waiting: provider unavailable since" in error, error
        assert "invalid_api_key" in error

        texts = dagster_texts(result, instance, home)
        for channel, text in texts.items():
            assert_no_key(f"Dagster {channel}", text)
        assert_no_key("the log records of the Dagster run", logs.text())
        parquet = pq.read_table(output_root / "answers" / "day-1.parquet").to_pandas()
        assert_no_key("the asset's Parquet output", parquet.to_csv())
        # Not vacuous: errors, the paused job's reason, the worker's Python logs and stdout were all scanned.
        assert "context_length_exceeded" in texts["metadata"] + parquet.to_csv()
        assert "invalid_api_key" in texts["event log"]
        assert "Sending HTTP Request" in texts["event log"]  # the openai SDK's debug records, from the worker
        assert "circuit openai/refused/gpt-4o-mini opened: OpenAI refused the API key" in texts["event log"]  # worker's
        assert f"is {WAITING} since" in texts["event log"]  # the asset's own warning
        assert "items for day-1" in texts["captured compute logs"], "stdout was not captured"

        # Self-check: a key planted in metadata, the event log, a Python log and stdout is found in each.
        planted = ACCEPTED[0]

        @dg.asset
        def leaky(context):  # noqa: ANN202 - annotations would be unresolvable strings here
            context.log.info(f"context log {planted}")
            logging.getLogger("batchdb.workers.worker").warning("python log %s", planted)
            print(f"stdout {planted}")
            return dg.MaterializeResult(metadata={"planted": dg.MetadataValue.json({"key": planted})})

        leaked = dg.materialize([leaky], instance=instance)
        found = {channel: bool(leaks(text)) for channel, text in dagster_texts(leaked, instance, home).items()}
        assert found == dict.fromkeys(found, True), found
        python_log = [e for e in instance.all_logs(leaked.run_id) if "python log" in (e.user_message or "")]
        assert python_log and leaks(python_log[0].user_message)
    finally:
        instance.dispose()
