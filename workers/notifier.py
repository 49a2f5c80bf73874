"""The notification dispatcher: sends the outbox's webhooks and emails.

It runs inside every worker process as its own asyncio task on the worker's
connection pool and LISTEN connection (workers/connection.py), and sends outside
any statement, so a slow or hanging receiver never holds a connection, let alone
delays a claim or a completion. Any number of dispatchers share the work: each claims due rows of
`batchdb.notification_deliveries` with SKIP LOCKED under a short lease, sends
them outside any transaction (at most `max_in_flight` at once), records the
try in `notification_attempts` and the outcome on the delivery: delivered,
retried later with exponential backoff and jitter, or failed after
`max_attempts`. Woken by NOTIFY batchdb_notifications, with a polling fallback.

Delivery is at least once: a dispatcher killed after a receiver got a request
but before it recorded the answer sends it again later. Receivers deduplicate
on the X-Batchdb-Delivery header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import aiohttp
import psycopg
from psycopg.rows import DictRow

from batchdb import notifications
from batchdb.notifications import SmtpSettings
from batchdb.queries import query
from batchdb.workers.connection import Listener, Reconnecting
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown

log = logging.getLogger(__name__)

_REPLY_CHARS = 500


@dataclass
class NotifierConfig:
    max_in_flight: int = 8
    poll_interval: float = 2.0
    http_timeout: float = 10.0
    max_attempts: int = 10
    # Wait before retry n (1-based): min(cap, base * 2**(n-1)), less up to 25% jitter.
    backoff_base: float = 10.0
    backoff_cap: float = 3600.0
    # On stop: how long in-flight deliveries may finish before they are handed back.
    shutdown_grace: float = 5.0
    # None: no email from this process (it then claims only webhooks).
    smtp: SmtpSettings | None = field(default_factory=SmtpSettings.from_env)

    @property
    def lease_seconds(self) -> float:
        """A claimed delivery comes back to the queue after this: longer than any try may take."""
        smtp_timeout = self.smtp.timeout if self.smtp else 0.0
        return max(self.http_timeout, smtp_timeout) + 30.0

    @property
    def channels(self) -> list[str]:
        return [notifications.CHANNEL_WEBHOOK] + ([notifications.CHANNEL_EMAIL] if self.smtp else [])


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before the try after try `attempt`: doubling, capped, with 0-25% jitter below
    the step, so retries of many deliveries spread out but each wait stays longer than the last."""
    step: float = min(cap, base * 2 ** max(attempt - 1, 0))  # int ** int is typed Any (negative powers)
    return step * (1.0 - 0.25 * (rng or random).random())


@dataclass(frozen=True)
class Delivery:
    """A claimed delivery: one try of one event to one target."""

    id: int
    job_id: int
    channel: str
    event: str
    payload: dict[str, Any]
    attempt: int
    target: str = field(repr=False)
    secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Delivery:
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            channel=row["channel"],
            event=row["event"],
            payload=row["payload"],
            attempt=row["attempts"],
            target=row["target"],
            secret=row["secret"],
        )

    def describe(self) -> str:
        where = notifications.redact_url(self.target) if self.channel == notifications.CHANNEL_WEBHOOK else "email"
        return f"{self.channel} delivery {self.id} ({self.event}, job {self.job_id}, {where})"


@dataclass
class TryResult:
    ok: bool
    http_status: int | None = None
    reply: str | None = None
    error: str | None = None
    # Retrying cannot help (an SMTP 5xx reply): fail now.
    permanent: bool = False


class Notifier:
    def __init__(
        self,
        dsn: str | None = None,
        config: NotifierConfig | None = None,
        *,
        worker_id: str,
        shutdown: Shutdown | None = None,
        db: Reconnecting | None = None,
        listener: Listener | None = None,
    ) -> None:
        """`shutdown`: the worker's; once it is stopping, a database that stays unreachable is given
        up on (deliveries not handed back are retried when their lease runs out). In a worker, `db`
        and `listener` are the worker's pool handle and its one LISTEN connection; without them
        (tests, a dispatcher on its own) the notifier makes its own from `dsn`."""
        if (db is None or listener is None) and dsn is None:
            raise ValueError("Notifier needs a dsn, or both a db and a listener")
        self.config = config or NotifierConfig()
        self.worker_id = worker_id
        self._own_listener = listener is None
        self._listener = listener if listener is not None else Listener(str(dsn), name="notify-listen")
        self._db = db if db is not None else Reconnecting(dsn, name="notify", shutdown=shutdown)
        self._wake = asyncio.Event()
        self._listener.subscribe(query("listen_notifications"), lambda _payload: self._wake.set())
        self._tasks: dict[asyncio.Task[None], Delivery] = {}
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self.delivered = 0

    async def run(self) -> None:
        """Deliver until cancelled; on cancel, let in-flight tries finish for `shutdown_grace`
        seconds, hand back the rest, close the connections."""
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": notifications.USER_AGENT}, timeout=aiohttp.ClientTimeout(total=None)
        )
        listener = asyncio.create_task(self._listener.run(), name="notifier-listen") if self._own_listener else None
        log.info("notifier %s started (channels: %s)", self.worker_id, ", ".join(self.config.channels))
        try:
            while True:
                try:
                    await self._loop()
                except DatabaseUnreachable:
                    # The worker is stopping and the database is gone: nothing to claim; wait for the cancel.
                    await asyncio.Event().wait()
                except Exception:
                    log.exception("notifier loop failed; restarting in 1s")
                    await asyncio.sleep(1.0)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            await self._shutdown()

    # -- claiming --------------------------------------------------------------------------

    async def _loop(self) -> None:
        last_sweep = 0.0
        while True:
            self._wake.clear()
            free = self.config.max_in_flight - len(self._tasks)
            claimed = 0
            if free > 0:
                try:
                    for delivery in await self._claim(free):
                        task = asyncio.create_task(self._deliver(delivery), name=f"notify-{delivery.id}")
                        self._tasks[task] = delivery
                        task.add_done_callback(self._task_done)
                        claimed += 1
                except psycopg.Error as exc:
                    log.error("claiming notifications failed: %s", exc)
            now = time.monotonic()
            if now - last_sweep >= self.config.poll_interval:
                last_sweep = now
                with contextlib.suppress(psycopg.Error):
                    await self._fail_abandoned()
            if free > 0 and claimed == free:
                continue  # there may be more due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)

    async def _claim(self, limit: int) -> list[Delivery]:
        async def claim(conn: psycopg.AsyncConnection[DictRow]) -> list[dict[str, Any]]:
            cur = await conn.execute(
                query("notify_claim"),
                {
                    "channels": self.config.channels,
                    "max_attempts": self.config.max_attempts,
                    "limit": limit,
                    "worker_id": self.worker_id,
                    "lease_seconds": self.config.lease_seconds,
                },
            )
            return await cur.fetchall()

        return [Delivery.from_row(row) for row in await self._db.run(claim, what="notify_claim")]

    async def _fail_abandoned(self) -> None:
        async def sweep(conn: psycopg.AsyncConnection[DictRow]) -> list[dict[str, Any]]:
            cur = await conn.execute(query("notify_fail_abandoned"), {"max_attempts": self.config.max_attempts})
            return await cur.fetchall()

        failed = await self._db.run(sweep, what="notify_fail_abandoned")
        if failed:
            log.warning("gave up on %d notification(s) whose last try never reported back", len(failed))

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("notification task crashed", exc_info=task.exception())

    # -- one try ---------------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        started = time.monotonic()
        try:
            if delivery.channel == notifications.CHANNEL_WEBHOOK:
                result = await self._post(delivery)
            else:
                result = await self._email(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("unexpected error sending %s", delivery.describe())
            result = TryResult(ok=False, error=f"internal error: {type(exc).__name__}: {exc}")
        if result.error:
            result.error = notifications.scrub(result.error, delivery.target, delivery.secret)[:2000]
        duration_ms = int((time.monotonic() - started) * 1000)
        retry_in = backoff_delay(delivery.attempt, self.config.backoff_base, self.config.backoff_cap, self._rng)
        status = await self._record(delivery, result, duration_ms, retry_in)
        if status == "delivered":
            self.delivered += 1
            log.info("%s delivered on attempt %d", delivery.describe(), delivery.attempt)
        elif status == "pending":
            log.warning(
                "%s attempt %d failed (%s); retrying in %.1fs",
                delivery.describe(),
                delivery.attempt,
                result.error,
                retry_in,
            )
            asyncio.get_running_loop().call_later(retry_in, self._wake.set)
        elif status == "failed":
            log.error("%s failed after %d attempt(s): %s", delivery.describe(), delivery.attempt, result.error)

    async def _record(self, delivery: Delivery, result: TryResult, duration_ms: int, retry_in: float) -> str | None:
        params = {
            "id": delivery.id,
            "attempt": delivery.attempt,
            "worker_id": self.worker_id,
            "duration_ms": duration_ms,
            "ok": result.ok,
            "http_status": result.http_status,
            "reply": result.reply,
            "error": None if result.ok else result.error,
            "give_up": result.permanent,
            "max_attempts": self.config.max_attempts,
            "retry_in": retry_in,
        }

        async def record(conn: psycopg.AsyncConnection[DictRow]) -> str | None:
            cur = await conn.execute(query("notify_record_attempt"), params)
            row = await cur.fetchone()
            return None if row is None else str(row["status"])

        try:
            return await self._db.run(record, what="notify_record_attempt")
        except psycopg.errors.ForeignKeyViolation:
            return None  # the job (and its deliveries) was deleted meanwhile
        except (psycopg.Error, DatabaseUnreachable) as exc:
            # The lease runs out and another try follows: at least once, never lost.
            log.error("recording %s failed: %s", delivery.describe(), exc)
            return None

    async def _post(self, delivery: Delivery) -> TryResult:
        assert self._session is not None and delivery.secret is not None
        body = notifications.encode_body(delivery.payload)
        headers = notifications.webhook_headers(
            event=delivery.event, delivery_id=delivery.id, secret=delivery.secret, body=body
        )
        try:
            async with asyncio.timeout(self.config.http_timeout):
                async with self._session.post(
                    delivery.target, data=body, headers=headers, allow_redirects=False
                ) as response:
                    # Only the status is kept: the job's owner reads the attempts, and a webhook
                    # pointed at an internal service must not hand them its answers.
                    ok = 200 <= response.status < 300
                    return TryResult(
                        ok=ok,
                        http_status=response.status,
                        error=None if ok else f"HTTP {response.status} {response.reason or ''}".strip(),
                    )
        except TimeoutError:
            return TryResult(ok=False, error=f"no response within {self.config.http_timeout:g}s")
        except aiohttp.ClientError as exc:
            return TryResult(ok=False, error=f"{type(exc).__name__}: {exc}")

    async def _email(self, delivery: Delivery) -> TryResult:
        settings = self.config.smtp
        if settings is None:  # not claimed without settings; a config change mid-flight
            return TryResult(ok=False, error="this worker has no SMTP settings (BATCHDB_SMTP_HOST)")
        message = notifications.email_message(delivery.payload, sender=settings.sender, recipient=delivery.target)
        try:
            # CRLF line ends: smtplib sends bytes as they are.
            raw = message.as_bytes(policy=SMTP_POLICY)
            reply = await asyncio.to_thread(_send_email, settings, raw, delivery.target)
        except smtplib.SMTPResponseException as exc:
            text = _smtp_text(exc.smtp_code, exc.smtp_error)
            return TryResult(ok=False, reply=text, error=f"SMTP {text}", permanent=500 <= exc.smtp_code < 600)
        except smtplib.SMTPRecipientsRefused as exc:
            code, msg = next(iter(exc.recipients.values()), (550, b"refused"))
            text = _smtp_text(code, msg)
            return TryResult(ok=False, reply=text, error=f"SMTP recipient refused: {text}", permanent=500 <= code < 600)
        except (OSError, smtplib.SMTPException) as exc:
            return TryResult(ok=False, error=f"{type(exc).__name__}: {exc}")
        return TryResult(ok=True, reply=reply)

    # -- stopping ----------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        held = dict(self._tasks)
        unfinished: list[Delivery] = []
        if held:
            _, pending = await asyncio.wait(set(held), timeout=self.config.shutdown_grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            unfinished = [held[task] for task in pending]
        try:
            # A statement cut short by the cancellation left its connection mid-protocol: the pool
            # discards that one, so the hand-back runs on a sound connection.
            await self._release(unfinished)
            await self._db.close()  # only a notifier's own connection; a worker's pool is the worker's
        finally:
            if self._session is not None:
                await self._session.close()
        log.info("notifier %s stopped after %d deliveries", self.worker_id, self.delivered)

    async def _release(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        params = {"id": [d.id for d in deliveries], "attempt": [d.attempt for d in deliveries]}
        try:
            await self._db.run(lambda c: c.execute(query("notify_release"), params), what="notify_release")
            log.info("handed back %d unfinished notification(s)", len(deliveries))
        except (psycopg.Error, DatabaseUnreachable) as exc:
            log.warning("handing back notifications failed (%s); their lease will run out", exc)


def _smtp_text(code: int, message: bytes | str) -> str:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)
    return f"{code} {text}"[:_REPLY_CHARS]


def _send_email(settings: SmtpSettings, message: bytes, recipient: str) -> str:
    """One message to one recipient (blocking; run in a thread). Returns the server's reply to DATA."""
    with smtplib.SMTP(settings.host, settings.port, timeout=settings.timeout) as smtp:
        smtp.ehlo()
        if settings.starttls:
            smtp.starttls(context=ssl.create_default_context())
            smtp.ehlo()
        if settings.username:
            smtp.login(settings.username, settings.password or "")
        code, reply = smtp.mail(settings.sender)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, reply, settings.sender)
        code, reply = smtp.rcpt(recipient)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({recipient: (code, reply)})
        code, reply = smtp.data(message)
        if code != 250:
            raise smtplib.SMTPDataError(code, reply)
        return _smtp_text(code, reply)
