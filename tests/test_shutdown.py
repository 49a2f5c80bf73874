"""Stopping a worker (workers/shutdown.py): warm and cold shutdown, unsent rows, an unreachable database.

In-process workers for what happens to rows; real worker processes (workers/processes.py)
for the signals themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

import batchdb
from batchdb import ledger
from batchdb.providers.base import ChatRequest, ChatResponse
from batchdb.workers.connection import Reconnecting
from batchdb.workers.processes import WorkerProcesses
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown
from batchdb.workers.worker import Worker, WorkerConfig


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` (bounded, generous: CI is a busy 2-core box)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class HeldProvider:
    """Every call waits until the test lets it answer."""

    name = "instant"

    def __init__(self) -> None:
        self.entered = 0
        self.release = asyncio.Event()

    async def complete(self, request: ChatRequest) -> ChatResponse:
        self.entered += 1
        await self.release.wait()
        return ChatResponse(text="ok", finish_reason="stop", prompt_tokens=5, completion_tokens=2, model=request.model)

    async def aclose(self) -> None:
        return None


def submit(dsn: str, n: int, model: str) -> batchdb.Job:
    frame = pd.DataFrame({"text": [f"{model} {i}" for i in range(n)]})
    return batchdb.submit(frame, prompt="{text}", model=model, provider="instant", dsn=dsn)


def rows_of(conn: psycopg.Connection, job: batchdb.Job) -> list[tuple[str, int]]:
    return [
        (r["status"], r["attempts"])
        for r in conn.execute(
            "SELECT status, attempts FROM batchdb.requests WHERE job_id = %s ORDER BY id", (job.id,)
        ).fetchall()
    ]


# -- the Shutdown state --------------------------------------------------------------------------


def test_shutdown_cuts_sleeps_short_and_gives_up_on_the_database_after_its_patience() -> None:
    async def scenario() -> None:
        shutdown = Shutdown(patience=3600)
        assert shutdown.may_retry_database()
        sleeper = asyncio.create_task(shutdown.sleep(3600))
        await asyncio.sleep(0)
        shutdown.request()
        await asyncio.wait_for(sleeper, 10)  # a stop wakes a sleeping loop
        assert shutdown.may_retry_database()  # warm: a database blip may still heal
        sleeper = asyncio.create_task(shutdown.sleep(3600))
        await asyncio.sleep(0)
        shutdown.request(cold=True)
        await asyncio.wait_for(sleeper, 10)  # turning cold wakes it again
        assert not shutdown.may_retry_database()  # cold: never wait for the database

    asyncio.run(scenario())
    expired = Shutdown(patience=0)
    expired.request()
    assert not expired.may_retry_database()


def test_reconnecting_gives_up_on_an_unreachable_database_once_stopping(dsn: str) -> None:
    nowhere = make_conninfo(dsn, host="127.0.0.1", port=closed_port())

    async def scenario() -> None:
        shutdown = Shutdown(patience=0.5)
        db = Reconnecting(nowhere, name="test", shutdown=shutdown)
        attempt = asyncio.create_task(db.run(lambda c: c.execute("SELECT 1"), what="select"))
        await asyncio.sleep(0.3)
        assert not attempt.done()  # not stopping: it keeps retrying, as through any outage
        shutdown.request()
        with pytest.raises(DatabaseUnreachable, match="select: connection failed"):
            await asyncio.wait_for(attempt, 30)
        # Once given up, later statements fail at their first connection error.
        with pytest.raises(DatabaseUnreachable):
            await asyncio.wait_for(db.run(lambda c: c.execute("SELECT 1"), what="select"), 30)

    asyncio.run(scenario())


# -- unsent rows go back at once -----------------------------------------------------------------


def test_stop_hands_back_rows_waiting_in_the_pacer_at_once_and_waits_only_for_sent_calls(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # One request per minute on the 'paced' lane: its rows wait in the pacer; the 'open' lane has no limit.
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger.set_limits(c, ledger.Lane("instant", "default", "paced"), rpm=1)
    paced = submit(dsn, 6, "paced")
    sent = submit(dsn, 2, "open")
    provider = HeldProvider()
    caplog.set_level(logging.INFO, logger="batchdb.workers")

    async def scenario() -> None:
        worker = Worker(
            WorkerConfig(dsn=dsn, concurrency=8, poll_interval=0.2, shutdown_grace=120), providers={"instant": provider}
        )  # type: ignore[dict-item]
        run = asyncio.create_task(worker.run())
        # Every row is claimed; the open lane's calls (and maybe one paced call) are at the provider.
        await asyncio.to_thread(
            wait_until,
            lambda: len(worker._held) == 8 and provider.entered >= 2,
            what="8 rows held and the open lane's calls sent",
        )
        n_sent = provider.entered
        worker.stop()
        # The calls that went out are still unanswered, yet the unsent rows are back in the queue.
        await asyncio.to_thread(
            wait_until,
            lambda: sum(s == "queued" for s, _ in rows_of(conn, paced)) == 8 - n_sent,
            what="the unsent rows handed back",
        )
        assert not run.done() and provider.entered == n_sent
        provider.release.set()
        await asyncio.wait_for(run, 60)
        return n_sent

    n_sent = asyncio.run(scenario())
    # The sent calls finished and were recorded with their one attempt; the rest never spent one.
    assert rows_of(conn, sent) == [("succeeded", 1)] * 2
    assert sorted(rows_of(conn, paced)) == sorted([("succeeded", 1)] * (n_sent - 2) + [("queued", 0)] * (8 - n_sent))
    messages = [r.getMessage() for r in caplog.records]
    assert f"handed back {8 - n_sent} row(s) whose call was not sent" in messages
    assert f"waiting up to 120s for {n_sent} sent request(s)" in messages
    assert not any("in-flight" in m for m in messages)
    # Stopping is not the job's fault: nothing was paused.
    assert paced.status().status == "running"


# -- real worker processes: signals --------------------------------------------------------------


class Listener:
    """A TCP server on 127.0.0.1 that hands each connection to `serve` on a thread of its own, until
    `close()`, which closes the listener and every connection it made."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.track(client):
                threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def track(self, sock: socket.socket) -> bool:
        """Close `sock` with the others on `close()` (at once if that has been called)."""
        with self._lock:
            if not self._closed:
                self._sockets.append(sock)
                return True
        sock.close()
        return False

    def close(self) -> None:
        # shutdown() first: close() alone does not wake the thread blocked in accept(), which then
        # takes one more connection (seen: a worker's connection came back through a stopped proxy).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            self._closed = True
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


class TcpProxy(Listener):
    """Forwards 127.0.0.1:<port> to PostgreSQL until `close()`: the database becomes unreachable
    for whoever connects through it."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        super().__init__()

    def serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self._target)
        if self.track(server):
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
            self._pipe(client, server)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def wait_for_log(workers: WorkerProcesses, text: str, timeout: float = 60.0) -> None:
    wait_until(lambda: text in workers.log_text(), timeout, what=f"{text!r} in the worker log")


def exits_within(workers: WorkerProcesses, timeout: float) -> int | None:
    """The exit code of the (only) worker if it exits within `timeout` seconds, else None."""
    try:
        return workers.processes[0].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def exits_cleanly_on_a_signal_while_reconnecting(workers: WorkerProcesses, sig: signal.Signals) -> str:
    """Send `sig` once the (only) worker is in its reconnect loop; check that it exits 0 within 30 s
    without a traceback, and return its log."""
    wait_for_log(workers, "connection failed")
    workers.processes[0].send_signal(sig)
    code = exits_within(workers, 30)
    log = workers.log_text()
    assert code == 0, log
    assert "Traceback" not in log
    return log


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_whose_database_is_unreachable_at_start_exits_on_a_signal(
    dsn: str, sig: signal.Signals, tmp_path: Path
) -> None:
    nowhere = make_conninfo(dsn, host="127.0.0.1", port=closed_port())
    with WorkerProcesses(nowhere, log_dir=tmp_path, grace=5) as workers:
        workers.start()
        exits_cleanly_on_a_signal_while_reconnecting(workers, sig)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_whose_database_goes_away_exits_on_a_signal(
    dsn: str, conn: psycopg.Connection, sig: signal.Signals, tmp_path: Path
) -> None:
    proxy = TcpProxy(conn.info.host, conn.info.port)
    with psycopg.connect(dsn, autocommit=True) as c:
        ledger.set_limits(c, ledger.Lane("instant", "default", "paced"), rpm=1)
    job = submit(dsn, 8, "paced")
    try:
        with WorkerProcesses(
            make_conninfo(dsn, host="127.0.0.1", port=proxy.port), log_dir=tmp_path, grace=5
        ) as workers:
            workers.start()
            # Rows held, waiting for capacity on the 1-RPM lane.
            wait_until(lambda: job.status().n_running == 8, what="8 rows claimed")
            proxy.close()
            log = exits_cleanly_on_a_signal_while_reconnecting(workers, sig)
    finally:
        proxy.close()
    assert "lease runs out" in log


class SilentProvider(Listener):
    """An HTTP endpoint that reads every request, counts it, and never answers: a call counted
    here was sent and stays in flight until the test ends."""

    def __init__(self) -> None:
        self.received = 0
        super().__init__()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def serve(self, client: socket.socket) -> None:
        data = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in data:
                data += client.recv(65536) or b"\0"
            self.received += 1


@pytest.mark.slow
def test_a_second_sigint_hands_back_every_held_row_at_once(dsn: str, conn: psycopg.Connection, tmp_path: Path) -> None:
    frame = pd.DataFrame({"text": [f"headline {i}" for i in range(8)]})
    job = batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="openai", dsn=dsn)
    provider = SilentProvider()
    env = {"OPENAI_BASE_URL": provider.base_url, "OPENAI_API_KEY": "sk-test"}
    try:
        with WorkerProcesses(dsn, env=env, args=("--concurrency", "8"), log_dir=tmp_path, grace=5) as workers:
            workers.start()
            wait_until(lambda: provider.received == 8, what="8 calls sent")
            worker = workers.processes[0]
            worker.send_signal(signal.SIGINT)
            wait_for_log(workers, "waiting up to 30s for 8")  # warm: it waits for the sent calls
            assert worker.poll() is None
            worker.send_signal(signal.SIGINT)
            code = exits_within(workers, 20)
    finally:
        provider.close()
    assert code == 0, workers.log_text()
    assert "cold shutdown" in workers.log_text()
    # Every row is back in the queue, no attempt spent, no lease left.
    held = conn.execute(
        "SELECT status, attempts, lease_owner FROM batchdb.requests WHERE job_id = %s", (job.id,)
    ).fetchall()
    assert [(r["status"], r["attempts"], r["lease_owner"]) for r in held] == [("queued", 0, None)] * 8
