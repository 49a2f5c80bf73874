"""Lane advertising (workers/lanes.py): a worker without a key never stops a job another worker can run."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable

import pandas as pd
import psycopg
import pytest

import batchdb
from batchdb import queue
from batchdb.providers import ErrorKind, ProviderError, lane_endpoint
from batchdb.providers.gemini import GeminiProvider
from batchdb.workers.connection import Reconnecting
from batchdb.workers.lanes import WAITING_PREFIX, LaneAdvertiser, public_endpoint
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import Worker, WorkerConfig

_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL", "BATCHDB_SECRETS_FILE")


@pytest.fixture(autouse=True)
def no_gemini_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process (and so every in-process worker) has no Gemini key unless a test gives one."""
    for name in list(os.environ):
        if name in _KEY_ENVS or name.startswith(("BATCHDB_KEY_", "BATCHDB_ENDPOINT_")):
            monkeypatch.delenv(name)


def serves(*providers: str) -> Callable[[str, str], str | None]:
    """A resolver that has keys for `providers` only (what another machine's environment would hold)."""

    def resolve(provider: str, key_alias: str) -> str | None:
        if provider in providers or provider == "instant":
            return None
        raise ProviderError(ErrorKind.QUOTA_EXHAUSTED, f"provider {provider}: no API key (checked GEMINI_API_KEY)")

    return resolve


def register(conn: psycopg.Connection, worker_id: str) -> None:
    conn.execute("INSERT INTO batchdb.workers (id, hostname, pid, concurrency) VALUES (%s, 'test', 1, 1)", (worker_id,))


def gemini_job(dsn: str, rows: int = 4) -> batchdb.Job:
    frame = pd.DataFrame({"text": [f"headline {i}" for i in range(rows)]})
    return batchdb.submit(frame, prompt="{text}", model="gemini-2.5-flash", provider="gemini", max_tokens=8, dsn=dsn)


def refresh(
    dsn: str,
    worker_id: str,
    resolve: Callable[[str, str], str | None],
    warm: Callable[[str, str], object] | None = None,
) -> LaneAdvertiser:
    async def run() -> LaneAdvertiser:
        advertiser = LaneAdvertiser(Reconnecting(dsn, name="lanes"), worker_id, resolve, warm=warm)
        try:
            await advertiser.refresh()
        finally:
            await advertiser.close()
        return advertiser

    return asyncio.run(run())


def test_advertised_lanes_name_endpoints_never_keys(
    conn: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-canary-key-123")
    monkeypatch.setenv("GEMINI_BASE_URL", "https://user:pa55word@gemini.example:8443/v1beta?key=AIza-canary-key-123")
    register(conn, "w1")
    refresh(dsn, "w1", lambda provider, alias: lane_endpoint(provider, key_alias=alias))
    row = conn.execute("SELECT lanes, lanes::text AS text FROM batchdb.live_workers WHERE id = 'w1'").fetchone()
    assert {"provider": "gemini", "key_alias": "default", "endpoint": "https://gemini.example:8443/v1beta"} in row[
        "lanes"
    ]
    assert {"provider": "instant", "key_alias": "default", "endpoint": None} in row["lanes"]
    # No OpenAI key in this process: that lane is not advertised.
    assert not any(lane["provider"] == "openai" for lane in row["lanes"])
    assert "canary" not in row["text"] and "pa55word" not in row["text"]
    assert public_endpoint("not a url") is None


def test_every_lane_with_a_key_is_warmed_at_the_first_refresh_before_any_job(
    conn: psycopg.Connection, dsn: str
) -> None:
    """A provider's SDK is loaded before the first claim even when its first job comes later: loaded
    then, in the event loop, it would hold up the heartbeats of the rows of other lanes in flight."""
    register(conn, "w1")
    warmed: list[tuple[str, str]] = []
    advertiser = refresh(dsn, "w1", serves("gemini"), warm=lambda provider, alias: warmed.append((provider, alias)))
    assert sorted(warmed) == [("gemini", "default"), ("instant", "default")]  # no OpenAI or Azure key here
    assert advertiser.claim_filter() == sorted(warmed)


def test_keyless_worker_leaves_a_job_another_live_worker_serves(conn: psycopg.Connection, dsn: str) -> None:
    job = gemini_job(dsn)
    register(conn, "keyed")
    register(conn, "keyless")
    keyed = refresh(dsn, "keyed", serves("gemini"))
    keyless = refresh(dsn, "keyless", serves())
    assert job.status().status == "running"
    assert ("gemini", "default") in keyed.claim_filter()
    assert ("gemini", "default") not in keyless.claim_filter()

    async def claim(lanes: list[tuple[str, str]]) -> list:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as c:
            return await queue.claim_batch(c, worker_id="keyless", limit=10, lease_seconds=60, lanes=lanes)

    assert asyncio.run(claim(keyless.claim_filter())) == []
    assert len(asyncio.run(claim(keyed.claim_filter()))) == 4


def test_job_pauses_only_when_no_live_worker_serves_it_and_resumes_when_one_does(
    conn: psycopg.Connection, dsn: str
) -> None:
    job = gemini_job(dsn)
    register(conn, "keyless")
    refresh(dsn, "keyless", serves())
    status = job.status()
    assert status.status == "paused"
    reason = status.status_reason or ""
    assert reason.startswith(WAITING_PREFIX) and "gemini key alias 'default'" in reason, reason
    assert "GEMINI_API_KEY" in reason and "resumes by itself" in reason
    # A user's resume is undone at once: still nobody can run it.
    assert job.resume()
    refresh(dsn, "keyless", serves())
    assert job.status().status == "paused"
    # A keyed worker that stopped is no help.
    register(conn, "gone")
    conn.execute("UPDATE batchdb.workers SET stopped_at = now() WHERE id = 'gone'")
    conn.execute("""UPDATE batchdb.workers SET lanes = '[{"provider": "gemini", "key_alias": "default"}]'
                     WHERE id = 'gone'""")
    refresh(dsn, "keyless", serves())
    assert job.status().status == "paused"

    register(conn, "keyed")
    refresh(dsn, "keyed", serves("gemini"))
    assert job.status().status == "running"
    # And the keyless worker no longer pauses it.
    refresh(dsn, "keyless", serves())
    assert job.status().status == "running"
    # Other pauses are not undone by a worker that serves the lane.
    conn.execute(
        "UPDATE batchdb.jobs SET status = 'paused', status_reason = 'budget of $1 reached' WHERE id = %s", (job.id,)
    )
    refresh(dsn, "keyed", serves("gemini"))
    assert job.status().status == "paused"


def test_a_worker_still_starting_may_serve_the_lane(conn: psycopg.Connection, dsn: str) -> None:
    job = gemini_job(dsn)
    register(conn, "starting")  # registered, lanes not advertised yet
    register(conn, "keyless")
    refresh(dsn, "keyless", serves())
    assert job.status().status == "running"
    refresh(dsn, "starting", serves("openai"))  # it has advertised: no Gemini key either
    refresh(dsn, "keyless", serves())
    assert job.status().status == "paused"


# -- end to end: real workers, the Gemini SDK and the simulator ---------------------------------------


def install_claim_audit(conn: psycopg.Connection) -> None:
    """Test-only: record the worker of every claim (a row going to 'running')."""
    conn.execute("""
        CREATE TABLE public.claim_audit (worker text, job_id bigint, id bigint);
        CREATE FUNCTION public.audit_claim() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.claim_audit VALUES (NEW.lease_owner, NEW.job_id, NEW.id);
            RETURN NULL;
        END $$;
        CREATE TRIGGER audit_claim AFTER UPDATE ON batchdb.requests FOR EACH ROW
            WHEN (NEW.status = 'running' AND OLD.status = 'queued') EXECUTE FUNCTION public.audit_claim();
    """)


def worker(dsn: str, providers: dict | None = None) -> Worker:
    return Worker(
        WorkerConfig(
            dsn=dsn,
            concurrency=4,
            poll_interval=0.2,
            lane_refresh_interval=0.2,
            retry=RetryPolicy(0.05, 0.2),
            notifier=None,
        ),
        providers=providers,
    )


async def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def test_two_workers_one_without_the_key_the_keyed_one_drains_the_job(
    conn: psycopg.Connection, dsn: str, simulator
) -> None:
    sim = simulator()
    install_claim_audit(conn)
    job = gemini_job(dsn, rows=30)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN batchdb_events")

        async def scenario() -> tuple[Worker, Worker]:
            keyed = worker(dsn, {"gemini": GeminiProvider(api_key="gm-test", base_url=sim.gemini_base_url)})
            keyless = worker(dsn)
            tasks = [asyncio.create_task(keyed.run())]
            await wait_for(lambda: conn.execute("SELECT count(*) AS n FROM batchdb.workers").fetchone()["n"] == 1)
            tasks.append(asyncio.create_task(keyless.run()))
            try:
                await wait_for(lambda: job.status().status != "running", timeout=120)
            finally:
                keyed.stop()
                keyless.stop()
                await asyncio.gather(*tasks)
            return keyed, keyless

        keyed, keyless = asyncio.run(scenario())
        events = [json.loads(n.payload) for n in listener.notifies(timeout=0.5)]
    status = job.status()
    assert (status.status, status.n_succeeded) == ("completed", 30)
    assert [e["status"] for e in events if e["job_id"] == job.id] == ["completed"]  # never paused
    claims = conn.execute("SELECT worker, count(*) AS n FROM public.claim_audit GROUP BY worker").fetchall()
    assert [(c["worker"], c["n"]) for c in claims] == [(keyed.id, 30)]
    assert (keyed.completed, keyless.completed) == (30, 0)
    lanes = {r["id"]: r["lanes"] for r in conn.execute("SELECT id, lanes FROM batchdb.workers").fetchall()}
    assert {"provider": "gemini", "key_alias": "default", "endpoint": None} in lanes[keyed.id]
    assert not any(lane["provider"] == "gemini" for lane in lanes[keyless.id])
    assert sim.stats(series=False)["totals"]["accepted"] == 30


def test_only_a_keyless_worker_pauses_the_job_and_a_keyed_worker_resumes_it(
    conn: psycopg.Connection, dsn: str, simulator
) -> None:
    sim = simulator()
    job = gemini_job(dsn, rows=10)

    async def scenario() -> tuple[Worker, Worker]:
        keyless = worker(dsn)
        tasks = [asyncio.create_task(keyless.run())]
        try:
            await wait_for(lambda: job.status().status == "paused")
            reason = job.status().status_reason or ""
            assert reason.startswith(WAITING_PREFIX) and "GEMINI_API_KEY" in reason, reason
            keyed = worker(dsn, {"gemini": GeminiProvider(api_key="gm-test", base_url=sim.gemini_base_url)})
            tasks.append(asyncio.create_task(keyed.run()))
            # Nobody types `batchdb resume`.
            await wait_for(lambda: job.status().status == "completed", timeout=120)
        finally:
            keyless.stop()
            if len(tasks) > 1:
                keyed.stop()
            await asyncio.gather(*tasks)
        return keyless, keyed

    keyless, keyed = asyncio.run(scenario())
    assert keyless.completed == 0 and keyed.completed == 10
    assert job.status().n_succeeded == 10
    assert sim.stats(series=False)["totals"]["accepted"] == 10


@pytest.mark.slow
def test_worker_processes_without_and_with_gemini_api_key(
    conn: psycopg.Connection,
    dsn: str,
    simulator,
    tmp_path,
) -> None:
    """The reported setup: worker processes whose environments differ only by GEMINI_API_KEY."""
    from batchdb.workers.processes import start_workers

    sim = simulator()
    install_claim_audit(conn)
    job = gemini_job(dsn, rows=40)
    env = {"GEMINI_BASE_URL": sim.gemini_base_url}
    keyless = start_workers(1, dsn, env=env, args=("--concurrency", "8"), log_dir=tmp_path)
    keyed = None
    try:
        deadline = time.monotonic() + 60
        while job.status().status != "paused":
            assert time.monotonic() < deadline, "the keyless worker never paused the job"
            time.sleep(0.1)
        assert "GEMINI_API_KEY" in (job.status().status_reason or "")
        keyed = start_workers(1, dsn, env={**env, "GEMINI_API_KEY": "gm-test"}, args=("--concurrency", "8"))
        deadline = time.monotonic() + 120
        while job.status().status != "completed":  # nobody types `batchdb resume`
            assert time.monotonic() < deadline, job.status()
            time.sleep(0.1)
    finally:
        codes = keyless.stop() + (keyed.stop() if keyed else [])
    assert codes == [0, 0]
    assert job.status().n_succeeded == 40
    keyed_pid = keyed.processes[0].pid
    owners = {r["worker"].split(":")[1] for r in conn.execute("SELECT DISTINCT worker FROM public.claim_audit")}
    assert owners == {str(keyed_pid)}  # the keyless process claimed none of the job's rows
    assert sim.stats(series=False)["totals"]["accepted"] == 40
