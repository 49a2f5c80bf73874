"""workers/metrics.py: a real worker's /metrics against what the database recorded, and its /healthz
while running, draining and cut off from the database."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import batchdb
from batchdb import ledger, settings
from batchdb.cli import cli
from batchdb.ledger import Lane
from batchdb.providers.base import ChatRequest, ChatResponse
from batchdb.providers.instant import InstantProvider
from batchdb.simulator.config import Distribution, Limits
from batchdb.workers.metrics import MetricsConfig
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.processes import start_workers
from batchdb.workers.worker import Worker, WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET (a 503 is an answer, not an error)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> tuple[str, Samples]:
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return text, samples


def total(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(value for (n, found), value in samples.items() if n == name and want <= found)


def exported_names(text: str) -> set[str]:
    """Every series name the exposition declares (families without samples yet included)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        names |= {sample.name for sample in family.samples}
    return names


def until(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def headlines(n: int) -> pd.DataFrame:
    return pd.DataFrame({"key": [f"k{i}" for i in range(n)], "text": [f"headline number {i}" for i in range(n)]})


# -- a worker process against the simulator ---------------------------------------------------------


@pytest.mark.timeout(300)
def test_a_worker_process_counts_what_the_database_records(dsn: str, simulator, tmp_path: Path) -> None:
    # The key admits 5 calls a second but the ledger is told 100,000 a minute: the first claim's 32
    # calls all go out before the first answer (0.2 s) comes back, and at least 27 of them get a 429.
    sim = simulator(
        seed=5,
        default_limits=Limits(rpm=300),
        count_rejected=False,
        latency_s=Distribution(kind="uniform", low=0.2, high=0.3),
        output_tokens=Distribution(kind="fixed", value=4),
    )
    with psycopg.connect(dsn) as conn:
        ledger.set_limits(conn, Lane("openai", "default", "gpt-4o-mini"), rpm=100_000)
    rows = 40
    job = batchdb.submit(
        headlines(rows),
        prompt="Sentiment: {text}",
        id_column="key",
        model="gpt-4o-mini",
        max_tokens=8,
        max_attempts=20,
        dsn=dsn,
    )
    port = free_port()
    workers = start_workers(
        1,
        dsn,
        env={"OPENAI_BASE_URL": sim.openai_base_url, "OPENAI_API_KEY": "sk-test"},
        args=("--concurrency", "32", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"),
        log_dir=tmp_path,
    )
    lane = "openai/default/gpt-4o-mini"
    try:
        try:
            until(lambda: _answers(port) == 200, what="/healthz 200")
        except AssertionError:
            raise AssertionError(f"no healthy worker; its log:\n{workers.log_text()}") from None
        assert json.loads(get(f"http://127.0.0.1:{port}/healthz")[1])["status"] == "ok"
        assert job.wait(timeout=240).status == "completed"
        with psycopg.connect(dsn) as conn:
            succeeded, failed, dead, retries = conn.execute(
                "SELECT n_succeeded, n_failed, n_dead, n_retries FROM batchdb.jobs WHERE id = %s", (job.id,)
            ).fetchone()
        # The job reads completed once the last outcome committed; the worker counts it when the
        # statement returns, a moment later.
        ident = str(job.id)
        text, samples = until(
            lambda: (
                (s := scrape(port)) and total(s[1], "batchdb_rows_completed_total", job_id=ident) == succeeded and s
            ),
            what="the completed counter to catch up",
        )
        totals = sim.stats(series=False)["totals"]
        assert succeeded == rows and failed == 0
        assert total(samples, "batchdb_rows_completed_total", lane=lane, job_id=ident) == rows
        assert total(samples, "batchdb_rows_failed_total", job_id=ident, status="dead") == dead
        assert total(samples, "batchdb_rows_retried_total", job_id=ident) == retries
        # Every claim starts a row; an outcome ends it (or a hand-back, which records none).
        assert total(samples, "batchdb_rows_claimed_total", job_id=ident) >= rows + retries
        # Each 429 the simulator sent was counted once, as a 429 and as a provider error of that kind.
        assert totals["rate_limited"] >= 32 - 5
        assert total(samples, "batchdb_rate_limited_total", lane=lane) == totals["rate_limited"]
        assert total(samples, "batchdb_provider_errors_total", lane=lane, kind="rate_limited") == totals["rate_limited"]
        assert total(samples, "batchdb_calls_in_flight", lane=lane) == 0
        assert total(samples, "batchdb_ledger_wait_seconds_count", lane=lane) >= totals["requests"]
        assert total(samples, "batchdb_db_round_trip_seconds_count", connection="claim", statement="claim_batch") > 0
        assert total(samples, "batchdb_db_round_trip_seconds_count", connection="complete") > 0
        assert total(samples, "batchdb_circuit_open", lane=lane) == 0
        assert total(samples, "batchdb_worker_healthy") == 1
        names = exported_names(text)
    finally:
        codes = workers.stop()
    assert codes == [0]
    # The alert rules name only series a worker exports (checked here, on a real worker's page).
    used = alert_metric_names()
    assert used and used <= names, sorted(used - names)


def _answers(port: int) -> int | None:
    try:
        return get(f"http://127.0.0.1:{port}/healthz")[0]
    except OSError:
        return None  # not listening yet


# -- in-process workers: health while draining, with the database gone, series dropped ------------


class HeldProvider:
    """Answers only once `release` is set: calls stay in flight as long as a test needs."""

    name = "instant"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.calls += 1
        await self.release.wait()
        return ChatResponse(text="ok", finish_reason="stop", prompt_tokens=3, completion_tokens=1)

    async def aclose(self) -> None:
        return None


def in_process(dsn: str, provider: object, **config: Any) -> Worker:
    settings_ = {
        "concurrency": 8,
        "poll_interval": 0.2,
        "retry": RetryPolicy(0.05, 0.2),
        "metrics": MetricsConfig(0, "127.0.0.1", queue_depth_interval=0.2),
        **config,
    }
    return Worker(WorkerConfig(dsn=dsn, **settings_), providers={"instant": provider})  # type: ignore[dict-item]


async def aget(url: str) -> tuple[int, str]:
    return await asyncio.to_thread(get, url)


async def wait_for(check: Callable[[], Awaitable[Any]], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def submit_instant(dsn: str, n: int) -> batchdb.Job:
    return batchdb.submit(
        headlines(n), prompt="Say: {text}", id_column="key", model="instant", provider="instant", dsn=dsn
    )


def test_healthz_is_503_while_the_worker_drains(dsn: str) -> None:
    job = submit_instant(dsn, 3)
    provider = HeldProvider()
    worker = in_process(dsn, provider, shutdown_grace=60)

    async def scenario() -> tuple[tuple[int, str], tuple[int, str], dict[str, Any], tuple[int, str]]:
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: asyncio.sleep(0, provider.calls == 3), what="three calls in flight")
        health = f"http://127.0.0.1:{worker.metrics.port}/healthz"
        running = await aget(health)
        _, page = await asyncio.to_thread(scrape, worker.metrics.port or 0)
        worker.stop()  # what SIGTERM does: the three sent calls may finish, nothing new is claimed
        draining = await aget(health)
        provider.release.set()
        await run
        gone: tuple[int, str]
        try:
            gone = await aget(health)
        except OSError as exc:
            gone = (0, str(exc))
        return running, draining, page, gone

    running, draining, page, gone = asyncio.run(scenario())
    assert running[0] == 200 and json.loads(running[1])["calls_in_flight"] == 3
    assert total(page, "batchdb_calls_in_flight", lane="instant/default/instant") == 3
    assert draining[0] == 503
    body = json.loads(draining[1])
    assert body["status"] == "stopping" and "draining" in body["reason"]
    assert gone[0] == 0  # the server stops with the worker
    assert job.status().n_succeeded == 3  # the drained calls were recorded


class PausableProxy:
    """A TCP proxy to PostgreSQL that can cut every connection and refuse new ones (`down()`) until
    `up()`: the database unreachable for the worker alone, without stopping the shared server."""

    def __init__(self, dsn: str) -> None:
        target = conninfo_to_dict(dsn)
        self._target = (str(target.get("host") or "127.0.0.1"), int(target.get("port") or 5432))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.dsn = make_conninfo(dsn, host="127.0.0.1", port=self._listener.getsockname()[1])
        self._up = True
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def down(self) -> None:
        with self._lock:
            self._up = False
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def up(self) -> None:
        self._up = True

    def close(self) -> None:
        self.down()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                _close(client)
                continue
            server = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def proxy(dsn: str) -> Iterator[PausableProxy]:
    found = PausableProxy(dsn)
    yield found
    found.close()


def test_healthz_is_503_while_the_database_is_unreachable_and_200_when_it_is_back(
    dsn: str, proxy: PausableProxy
) -> None:
    worker = in_process(proxy.dsn, InstantProvider())

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], float]:
        run = asyncio.create_task(worker.run())
        health = None

        async def status() -> int | None:
            if worker.metrics.port is None:
                return None
            return (await aget(f"http://127.0.0.1:{worker.metrics.port}/healthz"))[0]

        await wait_for(lambda: _is(status(), 200), what="healthy")
        health = f"http://127.0.0.1:{worker.metrics.port}/healthz"
        before = json.loads((await aget(health))[1])
        proxy.down()  # the idle worker's next claim (every 0.2 s) finds its connection gone
        await wait_for(lambda: _is(status(), 503), what="503")
        cut = json.loads((await aget(health))[1])
        proxy.up()
        await wait_for(lambda: _is(status(), 200), timeout=60, what="healthy again")
        back = json.loads((await aget(health))[1])
        _, page = await asyncio.to_thread(scrape, worker.metrics.port or 0)
        worker.stop()
        await run
        return before, cut, back, total(page, "batchdb_db_connection_lost_total")

    before, cut, back, lost = asyncio.run(scenario())
    assert before["status"] == "ok"
    assert cut["status"] == "database unreachable"
    assert "connection" in cut["reason"] and re.search(r"failing for \d+s", cut["reason"]), cut
    assert back["status"] == "ok"
    assert lost >= 1


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return (await value) == expected


def test_a_jobs_series_are_dropped_once_it_has_been_idle_for_the_ttl(dsn: str) -> None:
    first = submit_instant(dsn, 4)
    ttl = 1.0
    worker = in_process(dsn, InstantProvider(), metrics=MetricsConfig(0, "127.0.0.1", job_series_ttl=ttl))

    async def scenario() -> tuple[Samples, Samples]:
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: asyncio.sleep(0, worker.completed == 4), what="the job done")
        _, fresh = await asyncio.to_thread(scrape, worker.metrics.port or 0)
        await asyncio.sleep(ttl + 0.2)
        _, later = await asyncio.to_thread(scrape, worker.metrics.port or 0)
        worker.stop()
        await run
        return fresh, later

    fresh, later = asyncio.run(scenario())
    ident = str(first.id)
    assert total(fresh, "batchdb_rows_completed_total", job_id=ident) == 4
    assert total(fresh, "batchdb_rows_claimed_total", job_id=ident) == 4
    assert not [key for key in later if ("job_id", ident) in key[1]]
    # Families without a job label stay.
    assert total(later, "batchdb_db_round_trip_seconds_count") > 0


def test_the_queue_depth_gauges_follow_the_view(dsn: str, conn: psycopg.Connection) -> None:
    job = submit_instant(dsn, 5)
    conn.execute("UPDATE batchdb.jobs SET status = 'paused', status_reason = 'test' WHERE id = %s", (job.id,))
    provider = InstantProvider()
    worker = in_process(dsn, provider)

    async def scenario() -> Samples:
        run = asyncio.create_task(worker.run())

        async def held() -> Samples | None:
            if worker.metrics.port is None:
                return None
            _, page = await asyncio.to_thread(scrape, worker.metrics.port)
            return page if total(page, "batchdb_queue_held_rows", lane="instant/default/instant") == 5 else None

        page: Samples = await wait_for(held, what="the held rows")
        worker.stop()
        await run
        return page

    page = asyncio.run(scenario())
    assert total(page, "batchdb_queue_due_rows", lane="instant/default/instant") == 0


def test_lease_extensions_reclaims_and_open_circuits_are_counted(dsn: str, conn: psycopg.Connection) -> None:
    job = submit_instant(dsn, 2)
    # Row 1 was a killed worker's: its lease ran out a second ago.
    conn.execute(
        "UPDATE batchdb.requests SET status = 'running', attempts = 1, lease_owner = 'killed',"
        " lease_expires_at = now() - interval '1 second' WHERE job_id = %s AND custom_id = 'k0'",
        (job.id,),
    )
    conn.execute(
        "INSERT INTO batchdb.circuits (provider, key_alias, model, state, opened_at, next_probe_at, last_error)"
        " VALUES ('openai', 'default', 'gpt-4o', 'open', now(), now() + interval '1 hour', 'refused')"
    )
    provider = HeldProvider()
    worker = in_process(dsn, provider, lease_seconds=2.0, reclaim_interval=0.3)
    port = 0

    async def scenario() -> Samples:
        nonlocal port
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: asyncio.sleep(0, provider.calls == 2), what="both rows in flight")
        port = worker.metrics.port or 0

        async def extended() -> Samples | None:
            _, page = await asyncio.to_thread(scrape, port)
            ok = total(page, "batchdb_lease_extensions_total") >= 4 and total(page, "batchdb_circuit_open") == 1
            return page if ok else None

        page: Samples = await wait_for(extended, what="two extensions of both leases and the circuit")
        provider.release.set()
        worker.stop()
        await run
        return page

    page = asyncio.run(scenario())
    assert total(page, "batchdb_rows_reclaimed_total") == 1
    assert total(page, "batchdb_leases_lost_total") == 0
    assert total(page, "batchdb_circuit_open", lane="openai/default/gpt-4o") == 1
    assert total(page, "batchdb_circuit_open", lane="instant/default/instant") == 0
    assert job.status().n_succeeded == 2


# -- the command line ---------------------------------------------------------------------------


def test_worker_help_names_the_metrics_flags_and_their_variable() -> None:
    result = CliRunner().invoke(cli, ["worker", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--metrics-port" in text and "--metrics-host" in text
    assert "/metrics" in text and "/healthz" in text and "Default: off" in text
    assert settings.METRICS_PORT in text


def test_a_bad_metrics_port_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(cli, ["worker", "--metrics-port", "70000"])
    assert result.exit_code == 2 and "70000" in result.output
    monkeypatch.setenv(settings.METRICS_PORT, "metrics")
    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 1
    assert "BATCHDB_METRICS_PORT: expected a port number (1-65535), got 'metrics'" in result.output


def test_a_metrics_port_in_use_stops_the_worker_before_it_claims(dsn: str) -> None:
    job = submit_instant(dsn, 2)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            cli, ["worker", "--dsn", dsn, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"]
        )
    assert result.exit_code == 1, result.output
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.output
    assert job.status().n_done == 0


# -- the alert rules ------------------------------------------------------------------------------


EXPECTED_ALERTS = {
    "BatchdbNoWorkerWithRowsDue",
    "BatchdbLaneWaiting",
    "BatchdbDeadRowsRising",
    "BatchdbWorkerUnhealthy",
    "BatchdbRateLimited",
    "BatchdbCircuitOpen",
}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_metric_names() -> set[str]:
    return {name for rule in alert_rules() for name in re.findall(r"\bbatchdb_[a-z_]+\b", rule["expr"])}


def test_the_alert_rules_parse_with_the_expected_names() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} == EXPECTED_ALERTS
    for rule in rules:
        assert rule["expr"].strip() and rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
