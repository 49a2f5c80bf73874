"""Job notifications: what a webhook or an email says, and how receivers trust it.

The events and their JSON payloads are written by the database itself (the
outbox trigger in `sql/migrations/0004_notifications.sql`), so every way in —
SDK, CLI, plain SQL — notifies alike. This module holds what both sides of a
delivery need: checking targets at submit time, the exact body bytes, the
Stripe-style HMAC signature (`verify_signature` is for receivers), the SMTP
settings from the environment and the email a job event becomes. The
dispatcher that sends them is `workers/notifier.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

from batchdb import settings

CHANNEL_WEBHOOK = "webhook"
CHANNEL_EMAIL = "email"

EVENTS: dict[str, str] = {
    "job.completed": "completed",
    "job.failed": "completed with failed rows",
    "job.cancelled": "cancelled",
    "job.budget_paused": "paused: budget reached",
    "job.quota_exhausted": "paused: quota exhausted",
    "job.paused": "paused",
    # Still running: the lane's circuit is open and its rows wait (workers/breaker.py); once per outage.
    "job.provider_unavailable": "waiting: provider unavailable",
}

EVENT_HEADER = "X-Batchdb-Event"
DELIVERY_HEADER = "X-Batchdb-Delivery"
SIGNATURE_HEADER = "X-Batchdb-Signature"
USER_AGENT = "batchdb-webhooks/1"
# Receivers should refuse signatures older than this (replayed requests).
DEFAULT_TOLERANCE_S = 300.0
MIN_SECRET_LENGTH = 16

_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")


# -- targets, checked before anything is written ---------------------------------------------


def check_webhook_url(url: object) -> str:
    """The URL if a webhook can be POSTed to it; ValueError saying what is wrong otherwise."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    if any(ch.isspace() for ch in url):
        raise ValueError(f"expected a URL without spaces, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"the port of {url!r} is not a number from 1 to 65535") from None
    if not parts.hostname or port == 0:
        raise ValueError(f"expected a URL with a host, such as https://hooks.example.com/batchdb, got {url!r}")
    return url


def check_secret(secret: object) -> str:
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"expected a string of at least {MIN_SECRET_LENGTH} characters (leave it out to have one generated)"
        )
    return secret


def check_emails(addresses: str | Iterable[str]) -> list[str]:
    """One address or several (a list, or one string separated by commas); duplicates dropped."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected email addresses, got {item!r}")
        address = item.strip()
        if not _EMAIL.match(address):
            raise ValueError(f"{address!r} is not an email address such as 'ops@example.com'")
        if address not in found:
            found.append(address)
    return found


def new_secret() -> str:
    """A fresh webhook secret (256 random bits)."""
    return secrets.token_urlsafe(32)


# -- webhook bodies and signatures -----------------------------------------------------------


def encode_body(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): compact JSON, keys sorted."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _digest(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str,
    header: str | None,
    body: bytes | str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    *,
    now: float | None = None,
) -> bool:
    """Whether `header` (X-Batchdb-Signature) signs `body` (the raw request bytes) with `secret`
    within `tolerance_s` seconds of now. Several v1= values are allowed (secret rotation)."""
    if not header:
        return False
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                return False
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, raw)
    return any(hmac.compare_digest(expected, candidate) for candidate in candidates)


def webhook_headers(
    *, event: str, delivery_id: int, secret: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: event,
        DELIVERY_HEADER: str(delivery_id),
        SIGNATURE_HEADER: sign(secret, body, timestamp),
    }


def redact_url(url: str) -> str:
    """scheme://host[:port] only: a webhook's path often carries a token (Slack, Teams ...)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    return f"{parts.scheme}://{host}{port}/..."


def scrub(text: str, *secrets_: str | None) -> str:
    """`text` with any of the given URLs/secrets replaced (aiohttp errors quote the full URL)."""
    for value in secrets_:
        if value:
            text = text.replace(value, redact_url(value) if "://" in value else "***")
    return text


# -- email -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    """How this process sends email; from BATCHDB_SMTP_* (`from_env`). No host, no email."""

    host: str
    port: int = 25
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sender: str = "batchdb@localhost"
    starttls: bool = False
    timeout: float = 20.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SmtpSettings | None:
        """Settings from BATCHDB_SMTP_HOST, _PORT, _USERNAME, _PASSWORD, _FROM, _STARTTLS;
        None when BATCHDB_SMTP_HOST is unset. STARTTLS defaults to on when a username is set,
        so a password never crosses the network in clear unless asked to."""
        env = os.environ if env is None else env
        host = (env.get(settings.SMTP_HOST) or "").strip()
        if not host:
            return None
        username = env.get(settings.SMTP_USERNAME) or None
        raw_tls = env.get(settings.SMTP_STARTTLS)
        if raw_tls is None:
            starttls = username is not None
        elif problem := settings.value_problem(settings.SMTP_STARTTLS, raw_tls):
            raise ValueError(problem)
        else:
            starttls = settings.is_true(raw_tls)
        raw_port = (env.get(settings.SMTP_PORT) or "").strip()
        if raw_port:
            if problem := settings.value_problem(settings.SMTP_PORT, raw_port):
                raise ValueError(problem)
            port = int(raw_port)
        else:
            port = 587 if starttls else 25
        sender = (env.get(settings.SMTP_FROM) or "").strip() or f"batchdb@{socket.getfqdn()}"
        return cls(
            host=host,
            port=port,
            username=username,
            password=env.get(settings.SMTP_PASSWORD) or None,
            sender=sender,
            starttls=starttls,
        )


def _one_line(value: object, limit: int = 80) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def email_subject(payload: Mapping[str, Any]) -> str:
    event = str(payload.get("event", "job.event"))
    counts = payload.get("counts") or {}
    name = f" {_one_line(payload['name'])!r}" if payload.get("name") else ""
    cost = float(payload.get("cost_usd") or 0)
    return (
        f"[batchdb] {event}: job {payload.get('job_id')}{name} {EVENTS.get(event, event)} "
        f"({counts.get('succeeded', 0)}/{counts.get('total', 0)} succeeded, ${cost:.4f})"
    )


def email_text(payload: Mapping[str, Any]) -> str:
    event = str(payload.get("event", ""))
    job_id = payload.get("job_id")
    counts = payload.get("counts") or {}
    tokens = payload.get("tokens") or {}
    budget = payload.get("budget_usd")
    lines = [
        f"Job {job_id}{' (' + _one_line(payload['name']) + ')' if payload.get('name') else ''} "
        f"{EVENTS.get(event, event)}.",
        "",
        f"event:     {event}",
        f"status:    {payload.get('status')}",
    ]
    if payload.get("reason"):
        lines.append(f"reason:    {payload['reason']}")
    lines += [
        f"rows:      {counts.get('total', 0)} total, {counts.get('succeeded', 0)} succeeded, "
        f"{counts.get('failed', 0)} failed, {counts.get('dead', 0)} dead, {counts.get('cancelled', 0)} cancelled",
        f"tokens:    {tokens.get('prompt', 0):,} prompt + {tokens.get('completion', 0):,} completion",
        f"cost:      ${float(payload.get('cost_usd') or 0):.6f}" + (f" of a ${budget} budget" if budget else ""),
        f"model:     {payload.get('provider')} / {payload.get('model')}",
        f"owner:     {payload.get('owner')}",
        f"occurred:  {payload.get('occurred_at')}",
        f"delivery:  {payload.get('delivery_id')}",
        "",
        f"  batchdb status {job_id}",
        f"  batchdb results {job_id} -o results.parquet",
    ]
    if str(payload.get("status")) == "paused":
        lines.append(f"  batchdb resume {job_id} [--budget USD]")
    lines += ["", "The event as JSON:", json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False), ""]
    return "\n".join(lines)


def email_message(payload: Mapping[str, Any], *, sender: str, recipient: str) -> EmailMessage:
    """The email one job event becomes (plain text, the JSON payload at the end)."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = email_subject(payload)
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = sender.rpartition("@")[2] or None
    message["Message-ID"] = make_msgid(idstring=f"batchdb-delivery-{payload.get('delivery_id')}", domain=domain)
    message[EVENT_HEADER] = str(payload.get("event", ""))
    message[DELIVERY_HEADER] = str(payload.get("delivery_id", ""))
    message.set_content(email_text(payload))
    return message
