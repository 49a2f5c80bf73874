"""Hostile input through the submit path: every case is a clean submit or a clear InputError, never half a job."""

from __future__ import annotations

import math

import pandas as pd
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchdb
from batchdb import InputError

NASTY = [
    "O'Brien",
    'say "hi"',
    "$$; DROP TABLE batchdb.jobs; --",
    "back\\slash",
    "tab\there",
    "new\nline",
    "emoji 📈",
    "",
    "NULL",
    "\\N",
    ",",
    "%(job_id)s",
    "{headline}",
]


def counts(conn: psycopg.Connection) -> tuple[int, int]:
    jobs = conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"]
    rows = conn.execute("SELECT count(*) AS n FROM batchdb.requests").fetchone()["n"]
    return jobs, rows


def test_quotes_and_dollar_quotes_pass_through_untouched(dsn: str, conn: psycopg.Connection, drain) -> None:
    frame = pd.DataFrame({"id": [f"id-{i}-{text}" for i, text in enumerate(NASTY)], "headline": NASTY})
    name = "x'); DROP TABLE batchdb.requests; -- $$"
    job = batchdb.submit(frame, prompt="{headline}", id_column="id", name=name, model="m", provider="instant", dsn=dsn)
    drain()
    results = job.results()
    assert job.status().name == name
    assert list(results["custom_id"]) == list(frame["id"])
    assert list(results["headline"]) == NASTY
    assert list(results["response"]) == [f"echo: {text}"[:70] if len(text) > 64 else f"echo: {text}" for text in NASTY]
    assert counts(conn) == (1, len(NASTY))


column_values = st.one_of(
    st.lists(st.integers(min_value=-(2**62), max_value=2**62), min_size=1, max_size=6),
    st.lists(st.floats(allow_nan=True, allow_infinity=False), min_size=1, max_size=6),
    st.lists(st.text(max_size=40), min_size=1, max_size=6),
    st.lists(st.one_of(st.none(), st.text(max_size=10)), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=1, max_size=6),
)


@st.composite
def frames(draw: st.DrawFn) -> tuple[pd.DataFrame, str]:
    names = draw(st.lists(st.text(alphabet="abcxyz_", min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    length = draw(st.integers(min_value=0, max_value=6))
    data = {}
    for name in names:
        values = draw(column_values)
        data[name] = (values * 6)[:length]
    frame = pd.DataFrame(data)
    referenced = draw(st.sampled_from([*names, "missing_col"]))
    template = draw(st.sampled_from(["Rate {%s}", "{%s} then {%s}", "plain {%s}!"])).replace("%s", referenced)
    return frame, template


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=frames(), id_choice=st.sampled_from([None, "first"]))
def test_random_frames_submit_cleanly_or_fail_clearly(
    case: tuple[pd.DataFrame, str], id_choice: str | None, dsn: str, conn: psycopg.Connection
) -> None:
    frame, template = case
    id_column = frame.columns[0] if id_choice == "first" and len(frame.columns) else None
    before = counts(conn)
    try:
        job = batchdb.submit(frame, prompt=template, id_column=id_column, model="m", provider="instant", dsn=dsn)
    except InputError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
        assert counts(conn) == before  # nothing half-written
        if "missing_col" in template:
            assert "missing_col" in message
        elif len(frame) == 0:
            assert message == "the data has no rows"
        elif "contains a NUL character" in message:  # st.text() draws "\x00", which PostgreSQL text cannot hold
            assert any("\x00" in str(v) for v in frame.to_numpy().ravel()), message
        else:
            assert id_column is not None and ("row" in message and repr(id_column) in message), message
        return
    assert "missing_col" not in template and len(frame) > 0
    status = job.status()
    assert status.n_total == len(frame) and status.status == "running"
    assert counts(conn) == (before[0] + 1, before[1] + len(frame))
    stored = conn.execute("SELECT input FROM batchdb.requests WHERE job_id = %s ORDER BY id", (job.id,)).fetchall()
    for (position, original), row in zip(frame.iterrows(), stored, strict=True):
        for column, value in original.items():
            kept = row["input"][column]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert kept is None
            elif isinstance(value, float):
                assert kept == pytest.approx(value, rel=1e-12), (position, column)
            else:
                assert kept == value, (position, column)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"response_schema": {"type": 12}}, "response_schema: response schema is not a valid JSON schema"),
        ({"response_schema": "nope"}, "response_schema: expected a JSON schema"),
        ({"max_attempts": 0}, "max_attempts: expected an integer >= 1"),
        ({"priority": -3}, "priority: expected an integer >= 1"),
        ({"max_tokens": 0}, "max_tokens: expected a positive integer"),
        ({"validation_retries": -1}, "validation_retries: expected an integer >= 0"),
    ],
)
def test_bad_job_options_are_refused(options: dict, message: str, dsn: str, conn: psycopg.Connection) -> None:
    with pytest.raises(InputError, match=message):
        batchdb.submit(pd.DataFrame({"h": ["x"]}), prompt="{h}", model="m", provider="instant", dsn=dsn, **options)
    assert counts(conn) == (0, 0)


@pytest.mark.parametrize(
    ("insert", "message"),
    [
        (
            "INSERT INTO batchdb.jobs (model, priority) VALUES ('m', 0)",
            "batchdb.jobs.priority: expected an integer >= 1",
        ),
        (
            "INSERT INTO batchdb.jobs (model, params) VALUES ('m', '[1, 2]')",
            "batchdb.jobs.params: expected a JSON object",
        ),
        ("INSERT INTO batchdb.jobs (model) VALUES (NULL)", "batchdb.jobs.model: expected a model name"),
        (
            "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (1, 'a', '{\"prompt\": 5}')",
            'batchdb.requests.payload: row custom_id=\'a\' expected {"prompt": "<text>"}',
        ),
        (
            "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (1, 'a', '\"text\"')",
            "batchdb.requests.input: row custom_id='a' expected a JSON object of column values",
        ),
        (
            'INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES (1, NULL, \'{"prompt": "x"}\')',
            'null value in column "custom_id"',
        ),
    ],
)
def test_sql_contract_refuses_bad_rows_with_the_column_named(
    insert: str, message: str, conn: psycopg.Connection
) -> None:
    conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini')")
    with pytest.raises(psycopg.Error) as refused:
        conn.execute(insert)
    assert message in str(refused.value)
    assert counts(conn) == (1, 0)
