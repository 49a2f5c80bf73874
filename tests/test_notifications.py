"""Job notifications end to end: the outbox trigger, the dispatcher, a real HTTP receiver and a real SMTP server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from psycopg.rows import dict_row

import batchdb
from batchdb import notifications
from batchdb.cli import cli
from batchdb.notifications import SmtpSettings, verify_signature
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.instant import InstantProvider
from batchdb.workers.notifier import Notifier, NotifierConfig, backoff_delay
from batchdb.workers.worker import Worker, WorkerConfig

TIMEOUT = 15.0


def fast(**overrides: Any) -> NotifierConfig:
    settings: dict[str, Any] = {
        "poll_interval": 0.2,
        "http_timeout": 2.0,
        "backoff_base": 0.2,
        "backoff_cap": 1.0,
        "max_attempts": 3,
        "shutdown_grace": 0.3,
        "smtp": None,
    }
    return NotifierConfig(**{**settings, **overrides})


# -- a webhook receiver and an SMTP server on 127.0.0.1 ---------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """Records every POST; answers with `script` in order, then `default`; `hang` never answers."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    delay: float = 0.0
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    url: str = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Received(dict(request.headers), await request.read(), time.monotonic()))
        if self.hang:
            await self._release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        status = self.script.pop(0) if self.script else self.default
        return web.Response(status=status, text="thanks" if status < 300 else "nope")

    async def __aenter__(self) -> Receiver:
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hooks/batchdb"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._release.set()
        await self._runner.cleanup()


class Mailbox:
    """aiosmtpd handler: keeps every message; refuses recipients at nobody@..."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: ANN201
        if address.startswith("nobody@"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN201
        self.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
        return "250 Message accepted for delivery"


@contextlib.contextmanager
def smtp_server() -> Any:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, SmtpSettings(host="127.0.0.1", port=port, sender="batchdb@example.com", timeout=5.0)
    finally:
        controller.stop()


# -- helpers -----------------------------------------------------------------------------------


async def fetch(dsn: str, sql: str, *params: object) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


async def unfinished(dsn: str) -> int:
    rows = await fetch(
        dsn, "SELECT count(*) AS n FROM batchdb.notification_deliveries WHERE status IN ('pending', 'delivering')"
    )
    return int(rows[0]["n"])


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT, what: str = "condition") -> float:
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def dispatch(
    dsn: str,
    *configs: NotifierConfig,
    until: Callable[[], Awaitable[bool]] | None = None,
) -> list[Notifier]:
    """Run one dispatcher per config until `until` (default: no unfinished delivery left)."""
    notifiers = [Notifier(dsn, config, worker_id=f"test-{n}") for n, config in enumerate(configs)]
    tasks = [asyncio.create_task(n.run()) for n in notifiers]
    try:
        await eventually(until or (lambda: _none_unfinished(dsn)), what="deliveries done")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return notifiers


async def _none_unfinished(dsn: str) -> bool:
    return await unfinished(dsn) == 0


def sql_job(
    conn: psycopg.Connection, *, name: str = "sql job", webhooks: Sequence[str] = (), emails: Sequence[str] = ()
) -> int:
    job_id = conn.execute(
        "INSERT INTO batchdb.jobs (name, model, provider) VALUES (%s, 'm', 'instant') RETURNING id", (name,)
    ).fetchone()["id"]
    for url in webhooks:
        conn.execute(
            "INSERT INTO batchdb.notification_targets (job_id, channel, target, secret) "
            "VALUES (%s, 'webhook', %s, 'test-secret-0123456789')",
            (job_id, url),
        )
    for address in emails:
        conn.execute(
            "INSERT INTO batchdb.notification_targets (job_id, channel, target) VALUES (%s, 'email', %s)",
            (job_id, address),
        )
    return job_id


def submit(dsn: str, prompts: list[str], **options: Any) -> batchdb.Job:
    frame = pd.DataFrame({"text": prompts})
    return batchdb.submit(frame, prompt="{text}", model="gpt-4o-mini", provider="instant", dsn=dsn, **options)


def deliveries(conn: psycopg.Connection, job_id: int | None = None) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM batchdb.notification_deliveries WHERE %(j)s::bigint IS NULL OR job_id = %(j)s ORDER BY id",
        {"j": job_id},
    ).fetchall()


def attempts(conn: psycopg.Connection, delivery_id: int) -> list[dict[str, Any]]:
    return conn.execute(
        "SELECT * FROM batchdb.notification_attempts WHERE delivery_id = %s ORDER BY attempt, id", (delivery_id,)
    ).fetchall()


class Scripted:
    """The instant provider, with chosen prompts answered by an error."""

    name = "instant"

    def __init__(self, errors: dict[str, ProviderError]) -> None:
        self.errors = errors

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = str(request.messages[-1]["content"])
        if prompt in self.errors:
            raise self.errors[prompt]
        return ChatResponse(
            text=f"ok: {prompt}", finish_reason="stop", prompt_tokens=7, completion_tokens=3, model=request.model
        )

    async def aclose(self) -> None:
        return None


# -- signatures --------------------------------------------------------------------------------


def test_signature_verifies_only_the_signed_body_with_the_right_secret_in_time() -> None:
    body = notifications.encode_body({"event": "job.completed", "job_id": 7})
    header = notifications.sign("s3cret-s3cret-s3cret", body, timestamp=1_700_000_000)
    assert header.startswith("t=1700000000,v1=")
    at = 1_700_000_100.0
    assert verify_signature("s3cret-s3cret-s3cret", header, body, 300, now=at)
    assert verify_signature("s3cret-s3cret-s3cret", header, body.decode(), 300, now=at)
    assert not verify_signature("another-secret-xxxxx", header, body, 300, now=at)
    assert not verify_signature("s3cret-s3cret-s3cret", header, body.replace(b"7", b"8"), 300, now=at)
    assert not verify_signature("s3cret-s3cret-s3cret", header, body, 60, now=at)  # too old: a replay
    assert not verify_signature("s3cret-s3cret-s3cret", "garbage", body, 300, now=at)
    assert not verify_signature("s3cret-s3cret-s3cret", None, body, 300, now=at)
    rotated = header + ",v1=" + "0" * 64
    assert verify_signature("s3cret-s3cret-s3cret", rotated, body, 300, now=at)


def test_backoff_doubles_with_jitter_below_each_step_and_stops_at_the_cap() -> None:
    for attempt in range(1, 8):
        delay = backoff_delay(attempt, 1.0, 20.0)
        step = min(20.0, 2.0 ** (attempt - 1))
        assert 0.75 * step <= delay <= step
    assert backoff_delay(2, 1.0, 20.0) > 1.0 >= backoff_delay(1, 1.0, 20.0)


def test_smtp_settings_come_from_the_environment() -> None:
    assert SmtpSettings.from_env({}) is None
    plain = SmtpSettings.from_env({"BATCHDB_SMTP_HOST": "mail.internal", "BATCHDB_SMTP_FROM": "jobs@example.com"})
    assert plain == SmtpSettings(host="mail.internal", port=25, sender="jobs@example.com", starttls=False)
    auth = SmtpSettings.from_env(
        {
            "BATCHDB_SMTP_HOST": "smtp.example.com",
            "BATCHDB_SMTP_USERNAME": "u",
            "BATCHDB_SMTP_PASSWORD": "hunter2-password",
        }
    )
    assert auth is not None and (auth.port, auth.starttls, auth.username) == (587, True, "u")
    assert "hunter2" not in repr(auth)
    off = SmtpSettings.from_env({"BATCHDB_SMTP_HOST": "h", "BATCHDB_SMTP_PORT": "2525", "BATCHDB_SMTP_STARTTLS": "no"})
    assert off is not None and (off.port, off.starttls) == (2525, False)
    with pytest.raises(ValueError, match="BATCHDB_SMTP_PORT"):
        SmtpSettings.from_env({"BATCHDB_SMTP_HOST": "h", "BATCHDB_SMTP_PORT": "smtp"})
    with pytest.raises(ValueError, match="BATCHDB_SMTP_STARTTLS"):
        SmtpSettings.from_env({"BATCHDB_SMTP_HOST": "h", "BATCHDB_SMTP_STARTTLS": "maybe"})


# -- submit-time configuration -----------------------------------------------------------------


def test_bad_targets_are_refused_at_submit_naming_the_field_and_nothing_is_written(
    dsn: str, conn: psycopg.Connection
) -> None:
    refusals = [
        ({"webhook_url": "ftp://hooks.example.com/x"}, "webhook_url: expected an http:// or https:// URL"),
        ({"webhook_url": "https:///path-only"}, "webhook_url: expected a URL with a host"),
        ({"webhook_url": "hooks.example.com/x"}, "webhook_url: expected an http:// or https:// URL"),
        ({"webhook_url": "https://h.example.com/x", "webhook_secret": "short"}, "webhook_secret: expected a string"),
        ({"webhook_secret": "a-long-enough-secret"}, "webhook_secret: given without a webhook_url"),
        ({"notify_emails": ["ops@example.com", "bob"]}, "notify_emails: 'bob' is not an email address"),
    ]
    for options, message in refusals:
        with pytest.raises(batchdb.InputError, match=message):
            submit(dsn, ["a"], **options)
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"] == 0
    # Plain SQL is refused as clearly.
    job_id = sql_job(conn)
    with pytest.raises(psycopg.Error, match=r"notification_targets\.target: expected an http:// or https:// URL"):
        conn.execute(
            "INSERT INTO batchdb.notification_targets (job_id, channel, target) "
            "VALUES (%s, 'webhook', 'hooks.example.com')",
            (job_id,),
        )


def test_submit_stores_targets_generates_a_secret_and_returns_it_again_for_the_same_key(
    dsn: str, conn: psycopg.Connection
) -> None:
    job = submit(
        dsn,
        ["a", "b"],
        webhook_url="https://hooks.example.com/x",
        idempotency_key="k1",
        notify_emails="ops@example.com, lead@example.com,ops@example.com",
    )
    assert len(job.webhook_secret) >= 32
    targets = conn.execute(
        "SELECT channel, target, secret FROM batchdb.notification_targets WHERE job_id = %s ORDER BY id", (job.id,)
    ).fetchall()
    assert [(t["channel"], t["target"]) for t in targets] == [
        ("webhook", "https://hooks.example.com/x"),
        ("email", "ops@example.com"),
        ("email", "lead@example.com"),
    ]
    assert targets[0]["secret"] == job.webhook_secret and targets[1]["secret"] is None
    again = submit(dsn, ["a", "b"], webhook_url="https://hooks.example.com/x", idempotency_key="k1")
    assert (again.id, again.webhook_secret) == (job.id, job.webhook_secret)
    given = submit(dsn, ["c"], webhook_url="https://hooks.example.com/y", webhook_secret="my-own-secret-12345")
    assert given.webhook_secret == "my-own-secret-12345"
    # A running job is no event; nothing is queued until one happens.
    assert deliveries(conn) == []


def test_cli_submit_takes_webhook_and_emails_and_prints_a_generated_secret(
    dsn: str, tmp_path: Path, conn: psycopg.Connection
) -> None:
    source = tmp_path / "in.csv"
    pd.DataFrame({"headline": ["up", "down"]}).to_csv(source, index=False)
    base = ["submit", str(source), "--model", "m", "--provider", "instant", "--prompt", "{headline}"]
    result = CliRunner().invoke(
        cli,
        [
            *base,
            "--webhook-url",
            "https://hooks.example.com/x",
            "--notify-email",
            "ops@example.com",
            "--notify-email",
            "lead@example.com",
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    secret = conn.execute("SELECT secret FROM batchdb.notification_targets WHERE channel = 'webhook'").fetchone()
    assert result.output.splitlines() == ["job 1: 2 rows queued", f"webhook secret: {secret['secret']}"]
    emails = conn.execute("SELECT target FROM batchdb.notification_targets WHERE channel = 'email' ORDER BY id")
    assert [r["target"] for r in emails] == ["ops@example.com", "lead@example.com"]
    refused = CliRunner().invoke(cli, [*base, "--webhook-url", "not a url"])
    assert refused.exit_code == 1 and "webhook_url: expected a URL without spaces" in refused.output


# -- delivery ----------------------------------------------------------------------------------


def test_completed_job_posts_one_signed_webhook_matching_the_job(dsn: str, conn: psycopg.Connection) -> None:
    async def scenario() -> tuple[batchdb.Job, Receiver]:
        async with Receiver() as receiver:
            job = await asyncio.to_thread(
                submit, dsn, [f"p{i}" for i in range(20)], webhook_url=receiver.url, name="headlines"
            )
            worker = Worker(
                WorkerConfig(dsn=dsn, concurrency=8, poll_interval=0.2, notifier=fast()),
                providers={"instant": InstantProvider()},
            )
            running = asyncio.create_task(worker.run())
            try:
                await eventually(lambda: _delivered(dsn, job.id), what="webhook delivered")
                await asyncio.sleep(0.3)  # a duplicate would show up here
            finally:
                worker.stop()
                await asyncio.wait_for(running, TIMEOUT)
            return job, receiver

    job, receiver = asyncio.run(scenario())
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert verify_signature(job.webhook_secret, request.headers["X-Batchdb-Signature"], request.body, 60)
    assert not verify_signature("not-the-secret-at-all", request.headers["X-Batchdb-Signature"], request.body, 60)
    status = job.status()
    body = request.json
    [delivery] = deliveries(conn, job.id)
    assert request.headers["X-Batchdb-Event"] == body["event"] == "job.completed"
    assert request.headers["X-Batchdb-Delivery"] == str(body["delivery_id"]) == str(delivery["id"])
    assert request.headers["Content-Type"] == "application/json"
    assert (body["job_id"], body["name"], body["status"], body["owner"]) == (
        job.id,
        "headlines",
        "completed",
        status.owner,
    )
    assert body["counts"] == {
        "total": 20,
        "succeeded": 20,
        "failed": 0,
        "dead": 0,
        "cancelled": 0,
        "done": 20,
        "retries": 0,
    }
    assert body["tokens"] == {
        "prompt": status.prompt_tokens,
        "completion": status.completion_tokens,
        "total": status.prompt_tokens + status.completion_tokens,
    }
    assert body["cost_usd"] == float(status.cost_usd) and body["occurred_at"].endswith("Z")
    assert job.webhook_secret not in request.body.decode()
    assert body == delivery["payload"]
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
    [attempt] = attempts(conn, delivery["id"])
    # The receiver's body is not kept (the owner could read an internal service's answers).
    assert (attempt["ok"], attempt["http_status"], attempt["reply"]) == (True, 200, None)


async def _delivered(dsn: str, job_id: int) -> bool:
    rows = await fetch(dsn, "SELECT status FROM batchdb.notification_deliveries WHERE job_id = %s", job_id)
    return bool(rows) and all(r["status"] == "delivered" for r in rows)


def test_receiver_errors_are_retried_with_growing_delays_until_delivered(dsn: str, conn: psycopg.Connection) -> None:
    async def scenario() -> Receiver:
        async with Receiver(script=[500, 500]) as receiver:
            job_id = sql_job(conn, webhooks=[receiver.url])
            conn.execute("UPDATE batchdb.jobs SET status = 'completed' WHERE id = %s", (job_id,))
            await dispatch(dsn, fast(max_attempts=5))
            return receiver

    receiver = asyncio.run(scenario())
    [delivery] = deliveries(conn)
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 3)
    tries = attempts(conn, delivery["id"])
    assert [(t["attempt"], t["ok"], t["http_status"]) for t in tries] == [
        (1, False, 500),
        (2, False, 500),
        (3, True, 200),
    ]
    assert tries[0]["error"] == "HTTP 500 Internal Server Error"
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in itertools.pairwise(tries)]
    # backoff_base 0.2: the first wait is 0.15-0.2 s, the second 0.3-0.4 s. A busy machine can
    # only stretch a gap, so only the lower bounds are asserted; the second's lower bound is above
    # the first's upper one, which is what "growing" means here.
    assert gaps[0] >= 0.14 and gaps[1] >= 0.29, gaps
    assert len(receiver.requests) == 3 and {r.headers["X-Batchdb-Delivery"] for r in receiver.requests} == {
        str(delivery["id"])
    }
    assert all(
        verify_signature("test-secret-0123456789", r.headers["X-Batchdb-Signature"], r.body) for r in receiver.requests
    )


def test_permanently_failing_receivers_are_given_up_after_max_attempts_without_leaking_the_url(
    dsn: str, conn: psycopg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/hook/TOKEN-IN-PATH"

    async def scenario() -> Receiver:
        async with Receiver(default=503) as receiver:
            job_id = sql_job(conn, webhooks=[receiver.url + "/TOKEN-IN-PATH", closed])
            conn.execute("SELECT batchdb.cancel_job(%s)", (job_id,))
            await dispatch(dsn, fast(max_attempts=3))
            return receiver

    with caplog.at_level(logging.DEBUG, logger="batchdb.workers.notifier"):
        receiver = asyncio.run(scenario())
    failing, refused = deliveries(conn)
    assert (failing["status"], failing["attempts"], failing["last_error"]) == (
        "failed",
        3,
        "HTTP 503 Service Unavailable",
    )
    assert [t["http_status"] for t in attempts(conn, failing["id"])] == [503, 503, 503]
    assert len(receiver.requests) == 3
    assert (refused["status"], refused["attempts"]) == ("failed", 3)
    assert "ClientConnectorError" in refused["last_error"] and "TOKEN-IN-PATH" not in refused["last_error"]
    assert [t["http_status"] for t in attempts(conn, refused["id"])] == [None, None, None]
    assert "TOKEN-IN-PATH" not in caplog.text and "test-secret" not in caplog.text
    assert "failed after 3 attempt(s)" in caplog.text


def test_a_hanging_receiver_never_delays_the_workers_rows(dsn: str, conn: psycopg.Connection) -> None:
    async def scenario() -> tuple[float, float]:
        async with Receiver(hang=True) as receiver:
            first = await asyncio.to_thread(submit, dsn, ["a", "b"], webhook_url=receiver.url)
            config = fast(http_timeout=60.0, max_in_flight=1, shutdown_grace=0.3)
            worker = Worker(
                WorkerConfig(dsn=dsn, concurrency=16, poll_interval=0.2, notifier=config),
                providers={"instant": InstantProvider()},
            )
            running = asyncio.create_task(worker.run())
            try:
                await eventually(lambda: _true(bool(receiver.requests)), what="the receiver hanging")
                second = await asyncio.to_thread(submit, dsn, [f"p{i}" for i in range(300)], webhook_url=receiver.url)
                took = await eventually(lambda: _completed(dsn, second.id), what="second job completed")
                states = await fetch(
                    dsn, "SELECT status FROM batchdb.notification_deliveries WHERE job_id = %s", first.id
                )
                assert [s["status"] for s in states] == ["delivering"]
            finally:
                worker.stop()
                stopping = time.monotonic()
                await asyncio.wait_for(running, TIMEOUT)
            return took, time.monotonic() - stopping

    took, stop_took = asyncio.run(scenario())
    assert took < 5.0, took  # 300 rows by the same worker whose notifier is stuck
    assert stop_took < 5.0, stop_took
    # The stuck try was handed back uncounted, for the next worker.
    rows = conn.execute("SELECT status, attempts FROM batchdb.notification_deliveries ORDER BY id").fetchall()
    assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 0), ("pending", 0)]


async def _true(value: bool) -> bool:
    return value


async def _completed(dsn: str, job_id: int) -> bool:
    rows = await fetch(dsn, "SELECT status FROM batchdb.jobs WHERE id = %s", job_id)
    return rows[0]["status"] == "completed"


def test_each_kind_of_job_event_is_notified_as_such(dsn: str, conn: psycopg.Connection, drain) -> None:
    hook = "http://127.0.0.1:9/unused"
    quota = ProviderError(
        ErrorKind.QUOTA_EXHAUSTED,
        "RateLimitError (insufficient_quota): You exceeded your current quota",
        status_code=429,
    )
    bad = ProviderError(ErrorKind.PERMANENT, "BadRequestError: context too long", status_code=400)
    # quota: the worker pauses the job with the provider's reason; failed: a row the provider refused.
    quota_job = submit(dsn, ["over quota"], webhook_url=hook, name="quota")
    drain(Scripted({"over quota": quota}), notifier=None)
    failed_job = submit(dsn, ["fine", "refused"], webhook_url=hook, name="failed")
    drain(Scripted({"refused": bad}), notifier=None)
    # budget: the database's own budget check pauses it.
    budget_id = sql_job(conn, name="budget", webhooks=[hook])
    conn.execute("UPDATE batchdb.jobs SET budget_usd = 0.01, status = 'running' WHERE id = %s", (budget_id,))
    assert conn.execute("SELECT batchdb.reserve_budget(%s, 1) AS r", (budget_id,)).fetchone()["r"] == "paused"
    user_quota_id = sql_job(conn, name="user quota", webhooks=[hook])
    conn.execute(
        "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'user quota: daily budget of $5 for "
        "bob reached ($5.1 spent today); resumes at 00:00 UTC' WHERE id = %s",
        (user_quota_id,),
    )
    by_hand_id = sql_job(conn, name="by hand", webhooks=[hook])
    conn.execute(
        "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'paused by hand' WHERE id = %s", (by_hand_id,)
    )
    cancelled_id = sql_job(conn, name="cancelled", webhooks=[hook])
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) SELECT %s, g::text, "
        '\'{"prompt": "x"}\' FROM generate_series(1, 4) g',
        (cancelled_id,),
    )
    conn.execute("SELECT batchdb.cancel_job(%s)", (cancelled_id,))
    # Resuming and pausing again is a new event; a status that is no event (running) is none.
    conn.execute("UPDATE batchdb.jobs SET status = 'running', status_reason = NULL WHERE id = %s", (by_hand_id,))
    conn.execute(
        "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'paused by hand' WHERE id = %s", (by_hand_id,)
    )

    events = {(d["payload"]["name"], d["event"]) for d in deliveries(conn)}
    assert events == {
        ("quota", "job.quota_exhausted"),
        ("failed", "job.failed"),
        ("budget", "job.budget_paused"),
        ("user quota", "job.quota_exhausted"),
        ("by hand", "job.paused"),
        ("cancelled", "job.cancelled"),
    }
    assert len(deliveries(conn, by_hand_id)) == 2
    payloads = {d["payload"]["name"]: d["payload"] for d in deliveries(conn)}
    assert "insufficient_quota" in payloads["quota"]["reason"] and payloads["quota"]["status"] == "paused"
    assert payloads["budget"]["reason"].startswith("budget of $0.010000 reached")
    assert payloads["failed"]["counts"]["failed"] == 1 and payloads["failed"]["counts"]["succeeded"] == 1
    # cancel_job marks the job, then its rows: the payload has the counts at commit.
    assert payloads["cancelled"]["counts"]["cancelled"] == 4 and payloads["cancelled"]["status"] == "cancelled"
    assert quota_job.status().status == "paused" and failed_job.status().status == "completed"


def test_email_goes_to_each_recipient_through_smtp_and_only_from_workers_with_smtp_settings(
    dsn: str, conn: psycopg.Connection
) -> None:
    async def scenario(mailbox: Mailbox, smtp: SmtpSettings) -> int:
        async with Receiver() as receiver:
            job_id = sql_job(
                conn,
                name="nightly",
                webhooks=[receiver.url],
                emails=["ops@example.com", "lead@example.com", "nobody@example.com"],
            )
            conn.execute(
                "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'budget of $1 reached' WHERE id = %s",
                (job_id,),
            )
            # No SMTP settings: the webhook goes, the emails wait for a worker that can send them.
            await dispatch(dsn, fast(), until=lambda: _delivered_on(dsn, "webhook"))
            await asyncio.sleep(0.3)
            waiting = await fetch(
                dsn, "SELECT status, attempts FROM batchdb.notification_deliveries WHERE channel = 'email'"
            )
            assert [(w["status"], w["attempts"]) for w in waiting] == [("pending", 0)] * 3
            assert mailbox.messages == []
            await dispatch(dsn, fast(smtp=smtp))
            return job_id

    with smtp_server() as (mailbox, smtp):
        job_id = asyncio.run(scenario(mailbox, smtp))
    assert sorted(rcpt for rcpts, _ in mailbox.messages for rcpt in rcpts) == ["lead@example.com", "ops@example.com"]
    rcpts, message = mailbox.messages[0]
    assert message["Subject"].startswith(f"[batchdb] job.budget_paused: job {job_id} 'nightly' paused: budget reached")
    assert message["From"] == "batchdb@example.com" and message["To"] == rcpts[0]
    assert message["X-Batchdb-Event"] == "job.budget_paused"
    text = message.get_payload(decode=True).decode()
    assert f"Job {job_id} (nightly) paused: budget reached." in text and "reason:    budget of $1 reached" in text
    assert f"batchdb resume {job_id}" in text
    emails = {d["payload"]["delivery_id"]: d for d in deliveries(conn) if d["channel"] == "email"}
    by_address = {
        conn.execute("SELECT target FROM batchdb.notification_targets WHERE id = %s", (d["target_id"],)).fetchone()[
            "target"
        ]: d
        for d in emails.values()
    }
    assert by_address["ops@example.com"]["status"] == "delivered"
    assert attempts(conn, by_address["ops@example.com"]["id"])[0]["reply"].startswith("250 ")
    # A mailbox the server refuses for good (5xx) fails at once, with the server's reply.
    nobody = by_address["nobody@example.com"]
    assert (nobody["status"], nobody["attempts"]) == ("failed", 1)
    assert nobody["last_error"] == "SMTP recipient refused: 550 5.1.1 no such mailbox"


async def _delivered_on(dsn: str, channel: str) -> bool:
    rows = await fetch(dsn, "SELECT status FROM batchdb.notification_deliveries WHERE channel = %s", channel)
    return bool(rows) and all(r["status"] == "delivered" for r in rows)


def test_two_dispatchers_deliver_every_notification_exactly_once(dsn: str, conn: psycopg.Connection) -> None:
    async def scenario() -> tuple[Receiver, list[Notifier]]:
        async with Receiver(delay=0.02) as receiver:
            ids = [sql_job(conn, name=f"j{n}", webhooks=[receiver.url, receiver.url + "/second"]) for n in range(20)]
            conn.execute("UPDATE batchdb.jobs SET status = 'completed' WHERE id = ANY(%s)", (ids,))
            notifiers = await dispatch(dsn, fast(max_in_flight=3), fast(max_in_flight=3))
            await asyncio.sleep(0.2)
            return receiver, notifiers

    receiver, notifiers = asyncio.run(scenario())
    seen = Counter(r.headers["X-Batchdb-Delivery"] for r in receiver.requests)
    assert len(seen) == 40 and set(seen.values()) == {1}
    assert all(n.delivered > 0 for n in notifiers) and sum(n.delivered for n in notifiers) == 40
    rows = deliveries(conn)
    assert {(d["status"], d["attempts"]) for d in rows} == {("delivered", 1)}
    assert conn.execute("SELECT count(*) AS n FROM batchdb.notification_attempts").fetchone()["n"] == 40


def test_jobs_without_targets_create_no_deliveries(dsn: str, conn: psycopg.Connection, drain) -> None:
    job = submit(dsn, ["a", "b", "c"])
    drain(notifier=None)
    assert job.status().status == "completed"
    other = sql_job(conn)
    conn.execute("SELECT batchdb.cancel_job(%s)", (other,))
    assert deliveries(conn) == []
    # Deleting a job deletes its notification settings and history with it.
    with_hook = sql_job(conn, webhooks=["https://hooks.example.com/x"])
    conn.execute("SELECT batchdb.cancel_job(%s)", (with_hook,))
    assert len(deliveries(conn)) == 1
    conn.execute("DELETE FROM batchdb.jobs WHERE id = %s", (with_hook,))
    assert deliveries(conn) == []
    assert conn.execute("SELECT count(*) AS n FROM batchdb.notification_targets").fetchone()["n"] == 0
