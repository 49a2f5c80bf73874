"""Plain-SQL submissions are refused at INSERT for what would fail every row at the worker (0009_input_checks.sql)."""

from __future__ import annotations

import psycopg
import pytest

from batchdb.prompts import JOB_PARAMS, REQUEST_PARAMS
from batchdb.providers.compat import _EXTRA_PARAMS, _REQUEST_FIELDS


def refused(conn: psycopg.Connection, statement: str, *params: object) -> str:
    with pytest.raises(psycopg.errors.CheckViolation) as error:
        conn.execute(statement, params)
    return str(error.value).splitlines()[0]


def test_misspelt_job_params_are_refused_with_the_key(conn: psycopg.Connection) -> None:
    for key, meant in (("max_token", "max_tokens"), ("temprature", "temperature"), ("sytem", "system")):
        message = refused(
            conn,
            "INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s)",
            f'{{"prompt": "{{h}}", "{key}": 5}}',
        )
        assert message == (
            f'batchdb.jobs.params: unknown key "{key}" (did you mean "{meant}"?); '
            "known keys are listed in batchdb.request_params"
        )
    job = conn.execute(
        "INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s) RETURNING id",
        ('{"prompt": "{h}", "max_tokens": 5, "top_p": 0.9}',),
    ).fetchone()["id"]
    assert refused(conn, "UPDATE batchdb.jobs SET params = params || '{\"zzz\": 1}' WHERE id = %s", job) == (
        'batchdb.jobs.params: unknown key "zzz"; known keys are listed in batchdb.request_params'
    )


def test_misspelt_row_payload_keys_are_refused_with_the_row_and_key(conn: psycopg.Connection) -> None:
    job = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    message = refused(
        conn,
        "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES "
        '(%s, \'ok\', \'{"prompt": "hi"}\'), (%s, \'r-2\', \'{"prompt": "hi", "max_token": 3}\')',
        job,
        job,
    )
    assert message == (
        "batchdb.requests.payload: row custom_id='r-2' has unknown key \"max_token\" (did you mean "
        '"max_tokens"?); known keys: max_tokens, messages, model, prompt, response_format, seed, '
        "temperature"
    )
    assert conn.execute("SELECT count(*) AS n FROM batchdb.requests").fetchone()["n"] == 0


def test_rows_lacking_a_template_column_are_refused_with_the_column(conn: psycopg.Connection) -> None:
    job = conn.execute(
        "INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s) RETURNING id",
        ('{"system": "Be {tone}.", "prompt": "News for {ticker} on {day!s:>10} {{literal}}"}',),
    ).fetchone()["id"]
    message = refused(
        conn,
        "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'a', %s)",
        job,
        '{"ticker": "ACME", "date": "2026-11-02"}',
    )
    assert message == (
        "batchdb.requests.input: row custom_id='a' lacks column(s) day, tone that the job's "
        "template uses; it has: date, ticker"
    )
    conn.execute(
        "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'b', %s)",
        (job, '{"ticker": "ACME", "day": "2026-11-02", "tone": "brief"}'),
    )
    bare = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    assert refused(
        conn, "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'c', '{\"x\": 1}')", bare
    ).startswith(f"batchdb.requests.payload: row custom_id='c' has no payload and job {bare} has no prompt template")


def test_the_sql_list_of_keys_is_the_python_one(conn: psycopg.Connection) -> None:
    rows = conn.execute("SELECT name, in_job, in_row FROM batchdb.request_params").fetchall()
    in_job = {r["name"] for r in rows if r["in_job"]}
    in_row = {r["name"] for r in rows if r["in_row"]}
    # "dedupe": stored by submit(dedupe=False) (the rows' request keys do the work; docs/sql.md).
    assert in_job == {*JOB_PARAMS, "validation_retries", "dedupe", *_REQUEST_FIELDS, *_EXTRA_PARAMS}
    # build_request (batchdb/prompts.py) reads these from a row's payload.
    assert in_row == {"prompt", "messages", "model", *REQUEST_PARAMS}


def test_a_sql_job_with_an_unknown_model_is_refused_with_the_closest_name(conn: psycopg.Connection) -> None:
    message = refused(conn, "INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mni')")
    assert message.startswith(
        'batchdb.jobs.model: no price for openai/gpt-4o-mni in batchdb.prices (did you mean "gpt-4o-mini"?)'
    ), message
    assert "allow_unknown_model = true" in message
    gemini = refused(conn, "INSERT INTO batchdb.jobs (provider, model) VALUES ('gemini', 'gemini-2.5-flsh')")
    assert '(did you mean "gemini-2.5-flash"?)' in gemini, gemini
    # Allowed when asked for, and for the instant provider; a priced model needs nothing.
    for statement in (
        "INSERT INTO batchdb.jobs (model, allow_unknown_model) VALUES ('my-fine-tune', true)",
        "INSERT INTO batchdb.jobs (provider, model) VALUES ('instant', 'anything')",
        "INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini')",
    ):
        assert conn.execute(statement + " RETURNING id").fetchone()["id"] > 0, statement


def test_submit_with_allow_unknown_model_passes_the_sql_check(dsn: str) -> None:
    import pandas as pd

    import batchdb

    frame = pd.DataFrame({"text": ["a"]})
    with pytest.raises(batchdb.InputError, match="did you mean 'gpt-4o-mini'"):
        batchdb.submit(frame, prompt="{text}", model="gpt-4o-mni", dsn=dsn)
    job = batchdb.submit(frame, prompt="{text}", model="gpt-4o-mni", allow_unknown_model=True, dsn=dsn)
    assert job.status().n_total == 1
