"""Settler: every ledger reservation is settled, whatever the call's outcome.

Before a call the pacer reserves its worst case (prompt + max_tokens) from the
lane's token bucket. After the call this service hands the ledger the
difference between that reservation and what the provider counted:

- an answer: the provider's own prompt count replaces the estimate;
- a call refused without running (400/401/403/404/413/422, context length, a
  request the SDK refused to build, a connection that was never made): all of
  it comes back — a refused 400,000-token row must not leave the key in debt;
- a 429, a 5xx, a timeout or a connection dropped after sending: nothing comes
  back. The provider admitted (or may have admitted) the call and counted its
  tokens on arrival — OpenAI: "unsuccessful requests contribute to your
  per-minute limit"; Azure estimates a request's tokens when it is received;
  Gemini counts input tokens. See docs/ratelimits.md, "What a failed call costs".

Settlements from all of a worker's calls are folded per lane and written in one
statement (`batchdb.settle_capacity`) every `flush_interval`, on the ledger's
connection (shared with the pacer; never behind claims or completions).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections import defaultdict

from batchdb.ledger import Lane
from batchdb.providers.base import ErrorKind, ProviderError
from batchdb.queries import query
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)

# Statuses a provider answers without running the call (nothing generated, nothing to count).
REFUSED_STATUSES = frozenset({400, 401, 403, 404, 413, 422})
_NEVER_SENT_NAMES = frozenset(
    {
        "ConnectError",  # httpx: the TCP/TLS connection was never made
        "ClientConnectorError",
        "ClientConnectorDNSError",
        "ClientConnectorSSLError",  # aiohttp
        "UnsupportedRequest",  # batchdb.providers.compat: the request could not be expressed
    }
)


def tokens_to_give_back(error: BaseException, reserved_tokens: int) -> int:
    """How many of a failed call's reserved tokens go back to its lane (0 or all of them)."""
    if isinstance(error, ProviderError):
        if error.status_code in REFUSED_STATUSES:
            return reserved_tokens
        if error.status_code is not None or error.kind is ErrorKind.RATE_LIMITED:
            return 0  # 429, 408, 409, 5xx: admitted and counted on arrival
    return reserved_tokens if never_sent(error) else 0


def never_sent(error: BaseException) -> bool:
    """True when the exception chain shows the request never left this machine."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError | socket.gaierror | ssl.SSLCertVerificationError):
            return True
        if type(current).__name__ in _NEVER_SENT_NAMES:
            return True
        current = current.__cause__ or current.__context__
    return False


class Settler:
    def __init__(self, db: Reconnecting, *, flush_interval: float = 0.05) -> None:
        self._db = db
        self._flush_interval = flush_interval
        self._pending: defaultdict[Lane, int] = defaultdict(int)
        self._wake = asyncio.Event()
        self._stopping = False
        self.settled_tokens = 0  # given back (+) or taken (-) so far, for tests and logs

    def give_back(self, lane: Lane, tokens: int) -> None:
        """Return `tokens` to the lane's bucket (negative: the provider counted more than reserved)."""
        if tokens:
            self._pending[lane] += tokens
            self._wake.set()

    def settle_failure(self, lane: Lane, reserved_tokens: int, error: BaseException) -> int:
        """Settle a call that ended in `error`; returns the tokens given back."""
        back = tokens_to_give_back(error, reserved_tokens)
        self.give_back(lane, back)
        return back

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self._flush_interval)  # fold the calls ending together into one statement
            await self.flush()

    async def flush(self) -> None:
        """Write what is pending. Amounts leave `pending` only once written, so a flush cut short
        (a dropped connection, shutdown) leaves them for the next one."""
        batch = {lane: tokens for lane, tokens in self._pending.items() if tokens}
        if not batch:
            self._pending.clear()
            return
        lanes = list(batch)
        try:
            await self._db.run(
                lambda c: c.execute(
                    query("settle_capacity"),
                    {
                        "provider": [lane.provider for lane in lanes],
                        "key_alias": [lane.key_alias for lane in lanes],
                        "model": [lane.model for lane in lanes],
                        "tokens": [batch[lane] for lane in lanes],
                    },
                ),
                what="settle_capacity",
            )
        except Exception as exc:  # noqa: BLE001 - keep the tokens and try again with the next flush
            log.error("could not settle %d lane(s) with the ledger: %s; will retry", len(lanes), exc)
            self._wake.set()
            await asyncio.sleep(1.0)
            return
        for lane in lanes:
            self._pending[lane] -= batch[lane]
            if not self._pending[lane]:
                del self._pending[lane]
        self.settled_tokens += sum(batch.values())

    async def close(self) -> None:
        """Write what is pending, then close the connection (safe after the pacer closed it: it reconnects)."""
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await self.flush()
        await self._db.close()
