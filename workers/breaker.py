"""Breaker: one circuit per lane (provider, key alias, model), shared through the database.

Without it, a provider outage spends every row's attempts: each call fails, the row
retries with backoff, and after `max_attempts` it is `dead` and the job reads
`completed` although nothing was wrong with the rows. The breaker tells a lane's
failure from a row's:

- a lane-level failure (connection error, timeout, 5xx, and `ErrorKind.UNAVAILABLE`:
  404 on the route, DNS failure, a refused key: 401/403, Gemini's API_KEY_INVALID)
  counts towards the lane's streak; `threshold` in a row with no success between
  them, or one UNAVAILABLE, opens the circuit in `batchdb.circuits`
  (sql/migrations/0007_circuit_breaker.sql) for every worker;
- while it is open, claim_batch skips the lane, rows a worker holds go back to the
  queue without spending an attempt (`should_hand_back`), and the lane's jobs say
  `waiting: provider unavailable since T (last error ...)` and fire
  `job.provider_unavailable` once;
- this service, on its own connection, polls the open circuits; when one's probe is
  due it takes the probe (one worker at a time, under a lease), claims one real row
  of the lane and gives it to the worker (`on_probe`), which sends it as usual. A
  success closes the circuit (any successful call on the lane does); a lane-level
  failure puts the next probe twice as far off, up to `max_backoff`. So a key the
  operator rotates (workers restarted with the new one) resumes the lane's jobs by
  itself: the next probe goes out with the new key.

A refused key opens the circuit rather than pausing the job for that reason; what
pauses (`ErrorKind.QUOTA_EXHAUSTED`) is an account state the endpoint will not
change by being asked again: insufficient_quota, Gemini's daily or zero quota.

Only a row's own failures (400s, content filter, a 5xx while the lane is otherwise
healthy) spend its attempts. Like River's and resilience4j's breakers, state is
closed or open, with a single probe standing in for "half-open".
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg.rows import DictRow

from batchdb.ledger import Lane
from batchdb.models import ClaimedRequest
from batchdb.providers.base import ErrorKind, ProviderError
from batchdb.queries import query
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)

Key = tuple[int, int]


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    # Lane-level failures in a row (no success between them) that open the circuit.
    threshold: int = 5
    # First probe this long after opening; each failed probe doubles the wait, up to max_backoff.
    base_backoff: float = 2.0
    max_backoff: float = 60.0
    # How often the open circuits are read (and due probes taken).
    poll_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class OpenCircuit:
    lane: Lane
    opened_at: dt.datetime
    last_error: str | None
    next_probe_at: dt.datetime | None
    probes_failed: int
    # time.monotonic() when this worker learned it (see Breaker.should_hand_back).
    learned_at: float = field(default_factory=time.monotonic)


class Breaker:
    """The lanes' circuits as this worker sees them, and the probes it sends."""

    def __init__(
        self,
        db: Reconnecting,
        config: BreakerConfig,
        *,
        worker_id: str,
        lease_seconds: float,
        probe_lease_seconds: float,
        on_probe: Callable[[ClaimedRequest], None],
    ) -> None:
        self._db = db
        self.config = config
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._probe_lease_seconds = probe_lease_seconds
        self._on_probe = on_probe
        self._streak: dict[Lane, int] = {}
        self.open: dict[Lane, OpenCircuit] = {}
        # Rows this worker is sending as a lane's probe.
        self._probes: dict[Key, Lane] = {}

    # -- what the worker asks -----------------------------------------------------------------

    def is_open(self, lane: Lane) -> bool:
        return lane in self.open

    def is_probe(self, row: ClaimedRequest) -> bool:
        return row.key in self._probes

    async def failed(self, lane: Lane, row: ClaimedRequest, error: ProviderError, sent_at: float) -> bool:
        """Count a failed call sent at `sent_at` (time.monotonic()); True when the row must go back
        to the queue without spending an attempt because the lane (not the row) is at fault."""
        probe = self._probes.pop(row.key, None) is not None
        if not error.lane_level:
            # The endpoint answered (a 400, a 429 ...): the lane works, the row has its own problem.
            await self.answered(lane, probe=probe, sent_at=sent_at)
            return False
        if probe:
            due = await self._run(
                lambda c: c.execute(
                    query("circuit_probe_failed"),
                    {
                        **_lane_params(lane),
                        "error": error.message,
                        "base_s": self.config.base_backoff,
                        "max_s": self.config.max_backoff,
                    },
                ),
                what="circuit_probe_failed",
                fetch=True,
            )
            when = due["next_probe_at"] if due else None
            log.warning("circuit %s: probe failed (%s); next probe at %s", _name(lane), error.message, _clock(when))
            return True
        if lane in self.open:
            return True
        streak = self._streak.get(lane, 0) + 1
        self._streak[lane] = streak
        if error.kind is not ErrorKind.UNAVAILABLE and streak < self.config.threshold:
            return False
        await self.trip(lane, error.message)
        return True

    async def succeeded(self, lane: Lane, row: ClaimedRequest, sent_at: float) -> None:
        """A call on the lane sent at `sent_at` was answered: the streak ends, and an open circuit closes."""
        await self.answered(lane, probe=self._probes.pop(row.key, None) is not None, sent_at=sent_at)

    async def answered(self, lane: Lane, *, probe: bool, sent_at: float) -> None:
        """The probe, or a call sent after this worker learned the circuit opened, proves the lane
        works again; an answer to a call sent before (still in flight at the outage's start) does not."""
        self._streak.pop(lane, None)
        circuit = self.open.get(lane)
        if not probe and (circuit is None or sent_at < circuit.learned_at):
            return
        found = await self._run(
            lambda c: c.execute(query("circuit_close"), _lane_params(lane)), what="circuit_close", fetch=True
        )
        self.open.pop(lane, None)
        if found and found["open_for"] is not None:
            log.warning(
                "circuit %s closed: the provider answered again after %.0f s; its rows resume",
                _name(lane),
                found["open_for"].total_seconds(),
            )

    def should_hand_back(self, lane: Lane, row: ClaimedRequest, claimed_at: float) -> bool:
        """Before sending: whether the lane is open for this row. A row claimed after this worker
        learned the circuit opened was claimed while it was closed again (claim_batch skips open
        lanes): the cache is stale, and the row goes out."""
        circuit = self.open.get(lane)
        if circuit is None or row.key in self._probes:
            return False
        if claimed_at > circuit.learned_at:
            self.open.pop(lane, None)
            return False
        return True

    async def forget(self, row: ClaimedRequest) -> None:
        """The row ends without a verdict on its lane (handed back, crashed): if it was the
        probe, give the probe back so any worker can send the next one soon."""
        lane = self._probes.pop(row.key, None)
        if lane is not None:
            await self._give_back_probe(lane, self.config.base_backoff)

    async def trip(self, lane: Lane, error: str) -> None:
        """Open the lane's circuit for every worker (no-op when it is open already)."""
        result = await self._run(
            lambda c: c.execute(
                query("circuit_open"), {**_lane_params(lane), "error": error, "first_probe_s": self.config.base_backoff}
            ),
            what="circuit_open",
            fetch=True,
        )
        self._streak.pop(lane, None)
        if result is None:
            return
        self.open[lane] = OpenCircuit(lane, result["opened_at"], error, result["next_probe_at"], 0)
        if result["opened"]:
            log.warning(
                "circuit %s opened: %s; its rows wait in the queue (no attempt spent), "
                "one probe call from %s, then with backoff up to %.0f s",
                _name(lane),
                error,
                _clock(result["next_probe_at"]),
                self.config.max_backoff,
            )

    # -- the service loop --------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except psycopg.Error as exc:
                log.error("circuit breaker poll failed: %s; retrying", exc)
            await asyncio.sleep(self.config.poll_interval)

    async def poll_once(self) -> list[ClaimedRequest]:
        """Refresh the open circuits; take and start each due probe. Returns the probe rows started."""
        rows = await self._run(lambda c: c.execute(query("circuits_open")), what="circuits_open", fetch="all")
        now_open = {
            Lane(r["provider"], r["key_alias"], r["model"]): OpenCircuit(
                Lane(r["provider"], r["key_alias"], r["model"]),
                r["opened_at"],
                r["last_error"],
                r["next_probe_at"],
                r["probes_failed"],
            )
            for r in rows
        }
        for lane in now_open.keys() - self.open.keys():
            log.warning(
                "circuit %s is open (since %s: %s); its rows wait",
                _name(lane),
                _clock(now_open[lane].opened_at),
                now_open[lane].last_error,
            )
        for lane in self.open.keys() - now_open.keys():
            log.info("circuit %s closed; its rows resume", _name(lane))
        for lane, known in self.open.items():
            if lane in now_open and now_open[lane].opened_at == known.opened_at:
                now_open[lane] = dataclasses.replace(now_open[lane], learned_at=known.learned_at)
        self.open = now_open
        started = []
        probing = set(self._probes.values())
        for lane, circuit in now_open.items():
            if lane in probing:
                continue
            row = await self._take_probe(lane)
            if row is not None:
                self._probes[row.key] = lane
                log.info(
                    "circuit %s: sending job %s row %s as the probe (probe %d)",
                    _name(lane),
                    row.job_id,
                    row.id,
                    circuit.probes_failed + 1,
                )
                self._on_probe(row)
                started.append(row)
        return started

    async def _take_probe(self, lane: Lane) -> ClaimedRequest | None:
        params = {**_lane_params(lane), "worker_id": self._worker_id}
        taken = await self._run(
            lambda c: c.execute(query("circuit_take_probe"), {**params, "probe_lease_s": self._probe_lease_seconds}),
            what="circuit_take_probe",
            fetch=True,
        )
        if taken is None:
            return None
        row = await self._run(
            lambda c: c.execute(query("claim_probe_row"), {**params, "lease_seconds": self._lease_seconds}),
            what="claim_probe_row",
            fetch=True,
        )
        if row is None:
            # Nothing due on the lane right now (rows in retry backoff, or no job): look again later.
            await self._give_back_probe(lane, self.config.base_backoff)
            return None
        return ClaimedRequest(**row)

    async def _give_back_probe(self, lane: Lane, wait_s: float) -> None:
        await self._run(
            lambda c: c.execute(
                query("circuit_probe_not_sent"), {**_lane_params(lane), "worker_id": self._worker_id, "wait_s": wait_s}
            ),
            what="circuit_probe_not_sent",
        )

    async def _run(
        self, statement: Callable[[psycopg.AsyncConnection[DictRow]], Any], *, what: str, fetch: bool | str = False
    ) -> Any:
        async def go(conn: psycopg.AsyncConnection[DictRow]) -> Any:
            cur = await statement(conn)
            if fetch == "all":
                return await cur.fetchall()
            return await cur.fetchone() if fetch else None

        return await self._db.run(go, what=what)

    async def close(self) -> None:
        await self._db.close()


def _lane_params(lane: Lane) -> dict[str, str]:
    return {"provider": lane.provider, "key_alias": lane.key_alias, "model": lane.model}


def _name(lane: Lane) -> str:
    return f"{lane.provider}/{lane.key_alias}/{lane.model}"


def _clock(when: dt.datetime | None) -> str:
    return when.astimezone(dt.UTC).strftime("%H:%M:%SZ") if when else "?"
