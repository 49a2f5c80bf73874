"""WorkerMetrics: what a worker is doing, for Prometheus, and whether it is fit to work, for Kubernetes.

`batchdb worker --metrics-port 9100` (or `BATCHDB_METRICS_PORT`) serves, on the worker's own event
loop (aiohttp, already a dependency) and from a registry of its own (several workers in one process,
as the tests run them, never share one; prometheus_client's global registry is not used):

- `GET /metrics`: the families below, Prometheus text format.
- `GET /healthz`: 200 `{"status": "ok", ...}` while the claim loop runs and a database round trip
  succeeded within `db_stale_after` seconds; 503 with `status` and `reason` while the worker is
  starting, draining or stopping, or while the database is unreachable (which statement, on which
  connection, since when, the driver's error).

Off by default: without a port nothing listens and every hook returns at once, so the hot path
(about 10,000 rows/s per worker with an instant provider) pays one attribute test per hook. On, the
hooks cost 10-15 us per row (claimed, ledger wait, in flight, recorded; measured in a loop of 50,000).

Families (label `lane` is `provider/key_alias/model`, the lane of the ledger and the breaker):

    batchdb_rows_claimed_total{lane,job_id}            rows this worker started on (claims and probes)
    batchdb_rows_completed_total{lane,job_id}          rows recorded as succeeded
    batchdb_rows_failed_total{lane,job_id,status}      rows recorded failed (refused) or dead (out of attempts)
    batchdb_rows_retried_total{lane,job_id}            attempts recorded as failed, the row queued again
    batchdb_completions_fenced_total                   outcomes not recorded: the row was no longer this lease's
    batchdb_calls_in_flight{lane}                      provider calls sent and not answered yet
    batchdb_ledger_wait_seconds{lane}                  how long a call waited for rate-limit capacity (histogram)
    batchdb_rate_limited_total{lane}                   429 rate_limit answers (the ledger slows the key down)
    batchdb_provider_errors_total{lane,kind}           failed calls by kind (rate_limited, transient, timeout, ...)
    batchdb_circuit_open{lane}                         1 while the lane's circuit is open (workers/breaker.py)
    batchdb_lease_extensions_total                     row leases extended
    batchdb_leases_lost_total                          held rows found no longer this worker's when extending
    batchdb_rows_reclaimed_total                       expired leases (any worker's) this worker took back
    batchdb_db_round_trip_seconds{connection,statement} one statement's time on the database (histogram)
    batchdb_db_connection_lost_total{connection}       statements that found their connection lost
    batchdb_worker_healthy                             1 when /healthz would answer 200
    batchdb_queue_due_rows{lane}, batchdb_queue_oldest_due_age_seconds{lane}, batchdb_queue_held_rows{lane},
    batchdb_queue_scheduled_rows{lane}, batchdb_queue_running_rows{lane}, batchdb_queue_dead_rows{lane}
                                                       batchdb.queue_depth (0025), fleet-wide, read every
                                                       `queue_depth_interval` s: every worker exports the same
                                                       values, so aggregate them with max, not sum

The job label is `job_id`, not `job`: Prometheus gives every scraped series a `job` label of its own
(the scrape job) and renames an exported one to `exported_job`. Its cardinality is bounded: a job's
series are dropped `job_series_ttl` seconds (10 min) after this worker last touched one of its rows,
so a worker exports the jobs it worked on lately, never every job it ever ran. A job that comes back
starts its counters from 0 again, which `rate()` and `increase()` read as a counter reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg.rows import DictRow

from batchdb.errors import BatchDBError
from batchdb.ledger import Lane
from batchdb.models import Outcome, RequestStatus
from batchdb.providers.base import ErrorKind
from batchdb.queries import query
from batchdb.workers.connection import Database, Reconnecting
from batchdb.workers.shutdown import DatabaseUnreachable, Shutdown

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statement times: a claim takes about 1 ms; a database that stalls shows in the last buckets.
_DB_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Ledger waits: none on an idle lane, seconds on a busy key, up to a 429's retry-after.
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # The port /metrics and /healthz are served on (0: any free one, see WorkerMetrics.port).
    port: int
    host: str = "0.0.0.0"
    # /healthz says the database is unreachable when no round trip succeeded for this long. A working
    # worker makes one at least every heartbeat (10 s at most) and every poll (2 s) when idle.
    db_stale_after: float = 30.0
    # How often batchdb.queue_depth is read for the batchdb_queue_* gauges (about 2 ms a read).
    queue_depth_interval: float = 15.0
    # A job's series are dropped this long after the worker last touched one of its rows.
    job_series_ttl: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"metrics port must be between 0 and 65535, got {self.port}")


def lane_label(lane: Lane) -> str:
    return f"{lane.provider}/{lane.key_alias}/{lane.model}"


@dataclass(frozen=True, slots=True)
class Health:
    """What /healthz answers: `ok` (200) or why not (503)."""

    ok: bool
    status: str
    reason: str | None
    details: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {"status": self.status, **({"reason": self.reason} if self.reason else {}), **self.details}


class WorkerMetrics:
    """One worker's registry, its hooks (one call each in workers/worker.py) and its HTTP server."""

    def __init__(self, worker_id: str, config: MetricsConfig | None, shutdown: Shutdown) -> None:
        self.config = config
        self.enabled = config is not None
        self.port: int | None = None  # the bound port, once serving
        self._worker_id = worker_id
        self._shutdown = shutdown
        self.registry = CollectorRegistry()
        r = self.registry
        job_labels = ["lane", "job_id"]
        self._claimed = Counter("batchdb_rows_claimed", "Rows this worker started on.", job_labels, registry=r)
        self._completed = Counter("batchdb_rows_completed", "Rows recorded as succeeded.", job_labels, registry=r)
        self._failed = Counter(
            "batchdb_rows_failed",
            "Rows recorded as failed (the provider refused them) or dead (out of attempts).",
            [*job_labels, "status"],
            registry=r,
        )
        self._retried = Counter(
            "batchdb_rows_retried", "Attempts recorded as failed with the row queued again.", job_labels, registry=r
        )
        self._fenced = Counter(
            "batchdb_completions_fenced", "Outcomes not recorded: the row was no longer this lease's.", registry=r
        )
        self._in_flight = Gauge(
            "batchdb_calls_in_flight", "Provider calls sent and not answered yet.", ["lane"], registry=r
        )
        self._ledger_wait = Histogram(
            "batchdb_ledger_wait_seconds",
            "How long a call waited for rate-limit capacity from the ledger.",
            ["lane"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self._rate_limited = Counter(
            "batchdb_rate_limited", "Calls the provider answered with a 429 rate limit.", ["lane"], registry=r
        )
        self._errors = Counter(
            "batchdb_provider_errors", "Failed provider calls by kind.", ["lane", "kind"], registry=r
        )
        self._extended = Counter("batchdb_lease_extensions", "Row leases extended.", registry=r)
        self._leases_lost = Counter(
            "batchdb_leases_lost", "Held rows found no longer this worker's when extending.", registry=r
        )
        self._reclaimed = Counter(
            "batchdb_rows_reclaimed", "Rows whose lease expired, taken back to the queue by this worker.", registry=r
        )
        self._round_trip = Histogram(
            "batchdb_db_round_trip_seconds",
            "One statement's time on the database, from sending it to its reply.",
            ["connection", "statement"],
            buckets=_DB_BUCKETS,
            registry=r,
        )
        self._lost = Counter(
            "batchdb_db_connection_lost", "Statements that found their connection lost.", ["connection"], registry=r
        )
        r.register(_StateCollector(self))
        # Health.
        self._claim_loop = "not started"
        self._db_ok_at: float | None = None
        self._db_down: dict[str, tuple[float, str]] = {}  # connection -> (since, what failed)
        self._calls = 0
        # Cardinality: when each job was last touched, the series it has, its lane.
        self._job_seen: dict[int, float] = {}
        self._job_series: dict[int, set[tuple[Any, tuple[str, ...]]]] = {}
        self._job_lane: dict[int, str] = {}
        # Labelled children and lane labels, looked up once: labels() was most of the hooks' cost
        # (about 30 us per row with metrics on; 10-15 us with the lookups cached, on this 2-core machine).
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._lane_labels: dict[Lane, str] = {}
        self._in_flight_by_lane: dict[str, _InFlight] = {}
        # State read at scrape time: lanes seen, the breaker's open circuits, the queue depth.
        self._lanes: set[str] = set()
        self._circuits: Callable[[], Iterable[Lane]] = tuple
        self.queue_depth: list[dict[str, Any]] = []
        # Lanes the view has shown: one gone from it (its jobs finished) reads 0, not absent, so an
        # alert on the last value a worker exported does not keep the rows it had before (alerts.yaml).
        self._queue_lanes: set[str] = set()
        self._runner: web.AppRunner | None = None
        self._watcher: asyncio.Task[None] | None = None

    # -- hooks (workers/worker.py) -----------------------------------------------------------------

    def claimed(self, job_id: int, lane: Lane) -> None:
        """A claimed row's job is known (its first step): it counts for the job's lane."""
        if not self.enabled:
            return
        label = self._job_lane[job_id] = self._lane(lane)
        self._job_child(self._claimed, job_id, label).inc()

    def recorded(self, batch: list[Outcome], recorded: Collection[tuple[int, int]]) -> None:
        """The completer wrote `batch`; `recorded` are the keys the database took (the rest were fenced)."""
        if not self.enabled:
            return
        for outcome in batch:
            if outcome.key not in recorded:
                self._fenced.inc()
                continue
            label = self._job_lane.get(outcome.job_id, "")
            status = RequestStatus(outcome.status)
            if status is RequestStatus.SUCCEEDED:
                self._job_child(self._completed, outcome.job_id, label).inc()
            elif status in (RequestStatus.FAILED, RequestStatus.DEAD):
                self._job_child(self._failed, outcome.job_id, label, status.value).inc()
            elif status is RequestStatus.QUEUED:
                self._job_child(self._retried, outcome.job_id, label).inc()

    def calling(self, lane: Lane) -> contextlib.AbstractAsyncContextManager[None]:
        """`async with` around a provider call: it counts as in flight meanwhile."""
        if not self.enabled:
            return contextlib.nullcontext()
        label = self._lane(lane)
        found = self._in_flight_by_lane.get(label)
        if found is None:
            found = self._in_flight_by_lane[label] = _InFlight(self, self._in_flight.labels(label))
        return found

    def ledger_wait(self, lane: Lane, waiting: Awaitable[T]) -> Awaitable[T]:
        """`waiting` (the pacer's acquire), timed into batchdb_ledger_wait_seconds, grant or not."""
        if not self.enabled:
            return waiting
        return self._timed_wait(self._child(self._ledger_wait, (self._lane(lane),)), waiting)

    def provider_error(self, lane: Lane, kind: ErrorKind | str) -> None:
        if not self.enabled:
            return
        label = self._lane(lane)
        self._child(self._errors, (label, str(kind))).inc()
        if kind == ErrorKind.RATE_LIMITED:
            self._child(self._rate_limited, (label,)).inc()

    def leases_extended(self, held: int, extended: int) -> None:
        if not self.enabled:
            return
        self._extended.inc(extended)
        self._leases_lost.inc(max(0, held - extended))

    def reclaimed(self, rows: int) -> None:
        if self.enabled:
            self._reclaimed.inc(rows)

    async def claim_loop(self, loop: Awaitable[None]) -> None:
        """Run the worker's claim loop; /healthz is 200 only while it runs."""
        self._claim_loop = "running"
        try:
            await loop
        finally:
            self._claim_loop = "ended"

    # -- workers/connection.py's observer ------------------------------------------------------

    def round_trip(self, connection: str, statement: str, seconds: float) -> None:
        self._db_ok_at = time.monotonic()
        self._db_down.pop(connection, None)
        self._child(self._round_trip, (connection, statement)).observe(seconds)

    def lost(self, connection: str, statement: str, error: BaseException) -> None:
        since = self._db_down.get(connection, (time.monotonic(), ""))[0]
        self._db_down[connection] = (since, f"{statement}: {' '.join(str(error).split())}")
        self._lost.labels(connection).inc()

    # -- health --------------------------------------------------------------------------------

    def health(self) -> Health:
        now = time.monotonic()
        details: dict[str, Any] = {
            "worker": self._worker_id,
            "calls_in_flight": self._calls,
            "db_ok_seconds_ago": None if self._db_ok_at is None else round(now - self._db_ok_at, 3),
        }
        stale_after = self.config.db_stale_after if self.config is not None else MetricsConfig(0).db_stale_after
        if self._shutdown.stopping:
            how = "cold: every held row goes back now" if self._shutdown.cold.is_set() else "sent calls may finish"
            return Health(False, "stopping", f"stop requested, draining ({how}); nothing new is claimed", details)
        if self._db_down:
            connection, (since, what) = min(self._db_down.items(), key=lambda item: item[1][0])
            reason = f"{what} (on the {connection} connection, failing for {now - since:.0f}s)"
            return Health(False, "database unreachable", reason, details)
        if self._db_ok_at is None and self._claim_loop == "not started":
            return Health(False, "starting", "registering with the database", details)
        if self._db_ok_at is None or now - self._db_ok_at > stale_after:
            reason = f"no database round trip succeeded in the last {stale_after:.0f}s"
            return Health(False, "database unreachable", reason, details)
        if self._claim_loop != "running":
            reason = (
                "the claim loop has not started yet" if self._claim_loop == "not started" else "the claim loop ended"
            )
            return Health(False, "starting" if self._claim_loop == "not started" else "stopped", reason, details)
        return Health(True, "ok", None, details)

    # -- serving -------------------------------------------------------------------------------

    async def start(
        self,
        db: Reconnecting,
        *,
        circuits: Callable[[], Iterable[Lane]],
        connections: Iterable[Database],
    ) -> None:
        """Serve /metrics and /healthz (when configured), read batchdb.queue_depth on `db` every
        `queue_depth_interval` s, and observe `connections`. A port that cannot be bound stops the
        worker before it claims anything, with the reason."""
        if self.config is None:
            return
        for connection in connections:
            connection.observer = self
        self._circuits = circuits
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._health_page)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.config.host, self.config.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise BatchDBError(
                f"cannot serve metrics on {self.config.host}:{self.config.port}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._watcher = asyncio.create_task(self._watch_queue(db), name="metrics: queue depth")
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.config.host, self.port)

    async def close(self) -> None:
        """Stop serving (the last thing a stopping worker does: /healthz says 503 until then)."""
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_page(self, request: web.Request) -> web.Response:
        self._forget_idle_jobs()
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health_page(self, request: web.Request) -> web.Response:
        health = self.health()
        return web.Response(
            text=json.dumps(health.body()), status=200 if health.ok else 503, content_type="application/json"
        )

    async def _watch_queue(self, db: Reconnecting) -> None:
        """Read batchdb.queue_depth until the worker stops (stopping ends the sleep at once)."""
        assert self.config is not None
        complained = False
        while not self._shutdown.stopping:
            try:
                self.queue_depth = await db.run(_read_queue_depth, what="queue_depth")
                self._queue_lanes |= {_row_lane(row) for row in self.queue_depth}
            except DatabaseUnreachable:
                return
            except psycopg.Error as exc:  # e.g. a role without SELECT on the view: the rest still works
                if not complained:
                    log.warning("cannot read batchdb.queue_depth for the batchdb_queue_* metrics: %s", exc)
                    complained = True
            self._forget_idle_jobs()
            await self._shutdown.sleep(self.config.queue_depth_interval)

    # -- internals -----------------------------------------------------------------------------

    def _lane(self, lane: Lane) -> str:
        label = self._lane_labels.get(lane)
        if label is None:
            label = self._lane_labels[lane] = lane_label(lane)
            self._lanes.add(label)
        return label

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
        return child

    def _job_child(self, metric: Any, job_id: int, *labels: str) -> Any:
        """The labelled child of a per-job family, remembered so the job's series can be dropped."""
        self._job_seen[job_id] = time.monotonic()
        values = (labels[0], str(job_id), *labels[1:])
        child = self._children.get((metric, values))
        if child is None:
            child = self._children[(metric, values)] = metric.labels(*values)
            self._job_series.setdefault(job_id, set()).add((metric, values))
        return child

    def _forget_idle_jobs(self) -> None:
        if self.config is None:
            return
        cutoff = time.monotonic() - self.config.job_series_ttl
        for job_id in [job for job, seen in self._job_seen.items() if seen < cutoff]:
            for metric, values in self._job_series.pop(job_id, set()):
                self._children.pop((metric, values), None)
                with contextlib.suppress(KeyError):
                    metric.remove(*values)
            del self._job_seen[job_id]
            self._job_lane.pop(job_id, None)

    @staticmethod
    async def _timed_wait(histogram: Any, waiting: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await waiting
        finally:
            histogram.observe(time.perf_counter() - started)


class _InFlight:
    """`async with` around one provider call of a lane: counted in flight meanwhile (one per lane, reused)."""

    __slots__ = ("_gauge", "_metrics")

    def __init__(self, metrics: WorkerMetrics, gauge: Any) -> None:
        self._metrics = metrics
        self._gauge = gauge

    async def __aenter__(self) -> None:
        self._gauge.inc()
        self._metrics._calls += 1

    async def __aexit__(self, *exc: object) -> None:
        self._gauge.dec()
        self._metrics._calls -= 1


def _row_lane(row: dict[str, Any]) -> str:
    return lane_label(Lane(row["provider"], row["key_alias"], row["model"]))


async def _read_queue_depth(conn: psycopg.AsyncConnection[DictRow]) -> list[dict[str, Any]]:
    cur = await conn.execute(query("queue_depth"))
    return list(await cur.fetchall())


class _StateCollector(Collector):
    """Families read at scrape time from state kept elsewhere: health, circuits, queue depth."""

    _QUEUE = (
        ("due_rows", "Rows claimable now: queued, due, job running, circuit closed (batchdb.queue_depth)."),
        ("oldest_due_age_seconds", "How long the lane's oldest due row has been due (database time)."),
        ("held_rows", "Rows due but held: their job is paused or their lane's circuit is open."),
        ("scheduled_rows", "Rows queued for later: retries waiting out their backoff."),
        ("running_rows", "Rows leased to a worker now (any worker)."),
        ("dead_rows", "Rows of the lane's unfinished jobs that ran out of attempts."),
    )

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        healthy = GaugeMetricFamily("batchdb_worker_healthy", "1 when /healthz answers 200, else 0.")
        healthy.add_metric([], 1.0 if m.health().ok else 0.0)
        yield healthy
        circuit = GaugeMetricFamily(
            "batchdb_circuit_open", "1 while the lane's circuit is open (workers/breaker.py).", labels=["lane"]
        )
        open_lanes = {lane_label(lane) for lane in m._circuits()}
        for label in sorted(m._lanes | open_lanes):
            circuit.add_metric([label], 1.0 if label in open_lanes else 0.0)
        yield circuit
        rows = {_row_lane(row): row for row in m.queue_depth}
        for column, help_text in self._QUEUE:
            family = GaugeMetricFamily(f"batchdb_queue_{column}", help_text, labels=["lane"])
            for label in sorted(m._queue_lanes):
                value = rows[label][column] if label in rows else (None if column.endswith("_seconds") else 0)
                if value is not None:
                    family.add_metric([label], float(value))
            yield family
