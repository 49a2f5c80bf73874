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
        message = refused(conn, "INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s)",
                          f'{{"prompt": "{{h}}", "{key}": 5}}')
        assert message == (f'batchdb.jobs.params: unknown key "{key}" (did you mean "{meant}"?); '
                           "known keys are listed in batchdb.request_params")
    job = conn.execute("INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s) RETURNING id",
                       ('{"prompt": "{h}", "max_tokens": 5, "top_p": 0.9}',)).fetchone()["id"]
    assert refused(conn, "UPDATE batchdb.jobs SET params = params || '{\"zzz\": 1}' WHERE id = %s", job) == (
        'batchdb.jobs.params: unknown key "zzz"; known keys are listed in batchdb.request_params')


def test_misspelt_row_payload_keys_are_refused_with_the_row_and_key(conn: psycopg.Connection) -> None:
    job = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    message = refused(conn, "INSERT INTO batchdb.requests (job_id, custom_id, payload) VALUES "
                            "(%s, 'ok', '{\"prompt\": \"hi\"}'), (%s, 'r-2', '{\"prompt\": \"hi\", \"max_token\": 3}')",
                      job, job)
    assert message == ("batchdb.requests.payload: row custom_id='r-2' has unknown key \"max_token\" (did you mean "
                       "\"max_tokens\"?); known keys: max_tokens, messages, model, prompt, response_format, seed, "
                       "temperature")
    assert conn.execute("SELECT count(*) AS n FROM batchdb.requests").fetchone()["n"] == 0


def test_rows_lacking_a_template_column_are_refused_with_the_column(conn: psycopg.Connection) -> None:
    job = conn.execute("INSERT INTO batchdb.jobs (model, params) VALUES ('gpt-4o-mini', %s) RETURNING id",
                       ('{"system": "Be {tone}.", "prompt": "News for {ticker} on {day!s:>10} {{literal}}"}',)
                       ).fetchone()["id"]
    message = refused(conn, "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'a', %s)",
                      job, '{"ticker": "ACME", "date": "2026-11-02"}')
    assert message == ("batchdb.requests.input: row custom_id='a' lacks column(s) day, tone that the job's "
                       "template uses; it has: date, ticker")
    conn.execute("INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'b', %s)",
                 (job, '{"ticker": "ACME", "day": "2026-11-02", "tone": "brief"}'))
    bare = conn.execute("INSERT INTO batchdb.jobs (model) VALUES ('gpt-4o-mini') RETURNING id").fetchone()["id"]
    assert refused(conn, "INSERT INTO batchdb.requests (job_id, custom_id, input) VALUES (%s, 'c', '{\"x\": 1}')",
                   bare).startswith(f"batchdb.requests.payload: row custom_id='c' has no payload and job {bare} has "
                                    "no prompt template")


def test_the_sql_list_of_keys_is_the_python_one(conn: psycopg.Connection) -> None:
    rows = conn.execute("SELECT name, in_job, in_row FROM batchdb.request_params").fetchall()
    in_job = {r["name"] for r in rows if r["in_job"]}
    in_row = {r["name"] for r in rows if r["in_row"]}
    assert in_job == {*JOB_PARAMS, "validation_retries", *_REQUEST_FIELDS, *_EXTRA_PARAMS}
    # build_request (batchdb/prompts.py) reads these from a row's payload.
    assert in_row == {"prompt", "messages", "model", *REQUEST_PARAMS}
