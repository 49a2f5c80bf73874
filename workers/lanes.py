"""Lane advertising: which (provider, key alias) pairs this worker can call, told to the database.

A job names a provider and a key *alias*; each worker turns the alias into a key and an
endpoint from its own environment (`batchdb.secrets`). Workers started with different
environments can therefore serve different jobs, and one worker without `GEMINI_API_KEY`
must not stop a Gemini job that another worker can run. So each worker:

- advertises the lanes it resolved in ``batchdb.workers.lanes`` (provider, key alias and the
  endpoint as scheme://host/path: never a key);
- claims only rows of jobs on those lanes (`claim_filter`, passed to ``claim_batch``);
- pauses a running job for a missing key only when no live worker advertises its lane, with
  a reason that names what this worker checked;
- resumes jobs paused that way as soon as it serves their lane: starting a worker that has
  the key is all a user has to do.

Every `interval` seconds (and when poked) the advertiser reads the lanes of unfinished jobs,
checks each one locally (an environment / secrets-file lookup, no network), rewrites its
row when the answer changed, then pauses and resumes. It uses a connection of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.rows import DictRow

from batchdb.providers import KNOWN_PROVIDERS, ProviderError
from batchdb.queries import query
from batchdb.workers.connection import Reconnecting

log = logging.getLogger(__name__)

# Every pause made here starts with this, so only these pauses are undone here.
WAITING_PREFIX = "no live worker can serve "
DEFAULT_ALIAS = "default"


@dataclass(frozen=True, slots=True, order=True)
class KeyLane:
    """Where a job's calls go: a provider and the key alias the worker resolves."""

    provider: str
    key_alias: str

    def __str__(self) -> str:
        return f"{self.provider} key alias {self.key_alias!r}"


@dataclass(frozen=True, slots=True)
class LaneCheck:
    """What this worker found for a lane: the endpoint it would call, or why it cannot."""

    lane: KeyLane
    endpoint: str | None = None
    missing: str | None = None

    @property
    def servable(self) -> bool:
        return self.missing is None


class LaneUnavailable(Exception):
    """This worker cannot call the row's lane (its key went missing since it was advertised)."""

    def __init__(self, lane: KeyLane, reason: str) -> None:
        super().__init__(reason)
        self.lane = lane
        self.reason = reason


# Answers "can this process call provider P with alias A?": the endpoint, or raises ProviderError.
LaneResolver = Callable[[str, str], str | None]


def public_endpoint(url: str | None) -> str | None:
    """`url` as scheme://host[:port]/path: no user:password, query or fragment (a key may hide there)."""
    if not url:
        return None
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_lane(lane: KeyLane, resolve: LaneResolver) -> LaneCheck:
    try:
        endpoint = resolve(lane.provider, lane.key_alias)
    except ProviderError as exc:
        return LaneCheck(lane, missing=exc.message)
    return LaneCheck(lane, endpoint=public_endpoint(endpoint))


def waiting_reason(check: LaneCheck, worker_id: str) -> str:
    """The pause reason a user reads in `batchdb status`: what is missing and what fixes it."""
    return (
        f"{WAITING_PREFIX}{check.lane}: {check.missing} (checked by worker {worker_id}); "
        "start a worker that has this key and the job resumes by itself"
    )


class LaneAdvertiser:
    def __init__(
        self,
        db: Reconnecting,
        worker_id: str,
        resolve: LaneResolver,
        *,
        interval: float = 2.0,
        warm: Callable[[str, str], object] | None = None,
    ) -> None:
        """`warm(provider, key_alias)` builds the lane's client (importing its SDK blocks the event
        loop for seconds): it runs before the lane's rows are claimed, so their leases do not run
        out while the import holds the loop. Every lane this worker can serve is warmed, not only
        those with jobs: at the first refresh, before the first claim, for each provider it has a
        key for, so a job that comes later does not stall the rows of other lanes in flight."""
        self._db = db
        self._worker_id = worker_id
        self._resolve = resolve
        self._interval = interval
        self._warm = warm
        self._warmed: set[KeyLane] = set()
        self._checks: dict[KeyLane, LaneCheck] = {}
        self._advertised: list[dict[str, str | None]] | None = None
        self._poke = asyncio.Event()
        self._refreshing = asyncio.Lock()

    # -- what the claimer and the request tasks ask ------------------------------------------

    def claim_filter(self) -> list[tuple[str, str]]:
        """The (provider, key alias) pairs to claim rows of: lanes served whose client is built
        (each known provider's default lane and every lane with unfinished jobs); empty until the
        first refresh."""
        return sorted(
            (c.lane.provider, c.lane.key_alias) for c in self._checks.values() if c.servable and c.lane in self._warmed
        )

    def lost(self, provider: str, key_alias: str, reason: str) -> LaneUnavailable:
        """A call found its key gone: stop claiming on that lane now and re-advertise soon."""
        lane = KeyLane(provider, key_alias)
        self._checks[lane] = LaneCheck(lane, missing=reason)
        self._warmed.discard(lane)
        self._poke.set()
        return LaneUnavailable(lane, reason)

    def poke(self) -> None:
        self._poke.set()

    # -- the service -------------------------------------------------------------------------

    async def run(self) -> None:
        """Refresh every `interval` seconds or when poked, until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self._interval)
            self._poke.clear()
            try:
                await self.refresh()
            except psycopg.Error as exc:
                log.error("lane advertising failed: %s; retrying", exc)

    async def close(self) -> None:
        await self._db.close()

    async def refresh(self) -> None:
        """Check every lane in demand, advertise what changed, pause and resume jobs."""
        async with self._refreshing:
            demand = await self._db.run(self._read_demand, what="demanded_lanes")
            lanes = {KeyLane(p, DEFAULT_ALIAS) for p in KNOWN_PROVIDERS} | set(demand)
            checks = {lane: check_lane(lane, self._resolve) for lane in sorted(lanes)}
            for lane, check in checks.items():
                if check.servable and lane not in self._warmed:
                    try:
                        if self._warm is not None:
                            self._warm(lane.provider, lane.key_alias)
                    except (ProviderError, LaneUnavailable) as exc:
                        checks[lane] = LaneCheck(lane, missing=str(exc))
                    else:
                        self._warmed.add(lane)
            for lane, check in checks.items():
                before = self._checks.get(lane)
                if (before is None or before.servable) and not check.servable and demand.get(lane, (False, False))[0]:
                    log.warning("this worker cannot serve jobs on %s: %s", lane, check.missing)
            self._checks = checks
            advertised = [
                {"provider": c.lane.provider, "key_alias": c.lane.key_alias, "endpoint": c.endpoint}
                for c in checks.values()
                if c.servable
            ]
            if advertised != self._advertised:
                await self._db.run(
                    lambda c: c.execute(
                        query("advertise_lanes"), {"worker_id": self._worker_id, "lanes": json.dumps(advertised)}
                    ),
                    what="advertise_lanes",
                )
                self._advertised = advertised
            served = [lane for lane, (_, waiting) in demand.items() if waiting and checks[lane].servable]
            if served:
                await self._resume(served)
            unserved = [checks[lane] for lane, (running, _) in demand.items() if running and not checks[lane].servable]
            if unserved:
                await self._pause(unserved)

    async def _read_demand(self, conn: psycopg.AsyncConnection[DictRow]) -> dict[KeyLane, tuple[bool, bool]]:
        cur = await conn.execute(query("demanded_lanes"), {"waiting_prefix": WAITING_PREFIX})
        return {
            KeyLane(r["provider"], r["key_alias"]): (bool(r["running"]), bool(r["waiting"]))
            for r in await cur.fetchall()
        }

    async def _resume(self, lanes: list[KeyLane]) -> None:
        async def resume(conn: psycopg.AsyncConnection[DictRow]) -> list[int]:
            cur = await conn.execute(
                query("resume_served_lanes"),
                {
                    "provider": [lane.provider for lane in lanes],
                    "key_alias": [lane.key_alias for lane in lanes],
                    "waiting_prefix": WAITING_PREFIX,
                },
            )
            return [r["id"] for r in await cur.fetchall()]

        for job_id in await self._db.run(resume, what="resume_served_lanes"):
            log.info("job %s resumed: this worker serves its lane", job_id)

    async def _pause(self, checks: list[LaneCheck]) -> None:
        async def pause(conn: psycopg.AsyncConnection[DictRow]) -> list[DictRow]:
            cur = await conn.execute(
                query("pause_unserved_lanes"),
                {
                    "provider": [c.lane.provider for c in checks],
                    "key_alias": [c.lane.key_alias for c in checks],
                    "reason": [waiting_reason(c, self._worker_id) for c in checks],
                },
            )
            return list(await cur.fetchall())

        for row in await self._db.run(pause, what="pause_unserved_lanes"):
            log.warning(
                "job %s paused: no live worker can serve %s", row["id"], KeyLane(row["provider"], row["key_alias"])
            )
