"""A database seeded the ways users fill it: jobs submitted with the SDK and run by a real worker.

- "headlines-alpha" (alice, gpt-4o-mini, instant provider): 40 rows run by a worker whose
  provider refuses rows containing BAD (failed, permanent) and rate-limits rows containing
  SLOW until they are dead; then 10 more rows are inserted with plain SQL, which reopens the
  job (running, rows queued).
- "summaries-beta" (bob, gpt-4o, instant): 12 rows, all succeeded, completed.
- "backfill-gamma" (carol, gpt-4o-mini, openai, max_tokens 20): 25 rows, queued, no worker.
- The ledger: limits for openai/default/gpt-4o-mini and its usage in the current and
  previous minute (with 429s); one live worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import psycopg
import pytest
from psycopg.rows import dict_row

import batchdb
from batchdb.providers.base import ChatRequest, ChatResponse, ErrorKind, ProviderError
from batchdb.providers.instant import InstantProvider


class FlakyProvider(InstantProvider):
    """Answers like the instant provider, but refuses BAD rows and rate-limits SLOW rows."""

    async def complete(self, request: ChatRequest) -> ChatResponse:
        prompt = " ".join(str(m.get("content", "")) for m in request.messages)
        if "BAD" in prompt:
            raise ProviderError(ErrorKind.PERMANENT, "400 content filter: prompt refused", status_code=400)
        if "SLOW" in prompt:
            raise ProviderError(
                ErrorKind.RATE_LIMITED, "429 rate limit exceeded for requests", status_code=429, retry_after=0.01
            )
        return await super().complete(request)


@dataclass(frozen=True)
class Seeded:
    dsn: str
    alpha: int
    beta: int
    gamma: int


def headlines(n: int, prefix: str, *, bad: int = 0, slow: int = 0) -> pd.DataFrame:
    texts = []
    for i in range(n):
        tag = "BAD " if i < bad else "SLOW " if i < bad + slow else ""
        texts.append(f"{tag}Company {prefix}{i} reports quarterly results")
    return pd.DataFrame({"id": [f"{prefix}-{i:03d}" for i in range(n)], "headline": texts})


@pytest.fixture
def seeded(dsn: str, drain) -> Iterator[Seeded]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO batchdb.prices (provider, model, input_per_mtok, output_per_mtok) VALUES "
            "('instant', 'gpt-4o-mini', 0.15, 0.60), ('instant', 'gpt-4o', 2.50, 10.00)"
        )
    alpha = batchdb.submit(
        headlines(40, "a", bad=3, slow=2),
        prompt="Classify: {headline}",
        id_column="id",
        model="gpt-4o-mini",
        provider="instant",
        name="headlines-alpha",
        owner="alice",
        max_attempts=2,
        dsn=dsn,
    )
    beta = batchdb.submit(
        headlines(12, "b"),
        prompt="Summarise: {headline}",
        id_column="id",
        model="gpt-4o",
        provider="instant",
        name="summaries-beta",
        owner="bob",
        dsn=dsn,
    )
    drain(provider=FlakyProvider())
    gamma = batchdb.submit(
        headlines(25, "g"),
        prompt="Tag: {headline}",
        id_column="id",
        model="gpt-4o-mini",
        provider="openai",
        name="backfill-gamma",
        owner="carol",
        max_tokens=20,
        dsn=dsn,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO batchdb.requests (job_id, custom_id, input)
            SELECT %(job)s, 'a-extra-' || g, jsonb_build_object('headline', 'Extra headline ' || g)
              FROM generate_series(1, 10) g""",
            {"job": alpha.id},
        )
        conn.execute("""
            INSERT INTO batchdb.rate_limits (provider, key_alias, model, rpm, tpm)
            VALUES ('openai', 'default', 'gpt-4o-mini', 500, 100000)""")
        conn.execute("""
            INSERT INTO batchdb.rate_usage (provider, key_alias, model, minute, requests, tokens, rate_limited)
            SELECT 'openai', 'default', 'gpt-4o-mini', date_trunc('minute', now()) - ago * interval '1 minute',
                   requests, tokens, rate_limited
              FROM (VALUES (0, 100, 30000, 2), (1, 200, 60000, 1), (30, 50, 9000, 4))
                   AS v(ago, requests, tokens, rate_limited)""")
        conn.execute("""
            INSERT INTO batchdb.workers (id, hostname, pid, concurrency, in_flight, n_completed)
            VALUES ('worker-live-1', 'host-a', 4242, 64, 3, 1000)""")
    yield Seeded(dsn, alpha.id, beta.id, gamma.id)


class SQL:
    """Plain SQL against the test database: the reference the dashboard's figures are checked against."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def one(self, query: str, params: dict | None = None) -> dict:
        rows = self.all(query, params)
        assert len(rows) == 1, rows
        return rows[0]

    def all(self, query: str, params: dict | None = None) -> list[dict]:
        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def sql(dsn: str) -> SQL:
    return SQL(dsn)
