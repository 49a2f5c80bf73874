"""The SDK round trip: every input format in, results out, idempotency, and refusals before any write."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import batchdb
from batchdb import InputError

HEADLINES = pd.DataFrame(
    {
        "id": ["a1", "b2", "c3", "d4"],
        "headline": ["Acme beats estimates", "Globex fined", "Initech flat", 'Umbrella recalls, "again"\nsecond line'],
        "day": pd.to_datetime(["2026-01-02", "2026-01-03", "2026-01-04", "2026-01-05"]),
        "score": [1.5, None, 3.0, -2.25],
        "n": [1, 2, 3, 4],
    }
)


def write_source(kind: str, tmp_path: Path) -> object:
    frame = HEADLINES.copy()
    if kind == "dataframe":
        return frame
    if kind == "arrow":
        return pa.Table.from_pandas(frame, preserve_index=False)
    path = tmp_path / f"input.{kind}"
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True, date_format="iso")
    elif kind == "parquet":
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("kind", ["dataframe", "arrow", "csv", "jsonl", "parquet"])
def test_round_trip(kind: str, tmp_path: Path, dsn: str, drain) -> None:
    job = batchdb.submit(
        write_source(kind, tmp_path),
        prompt="Sentiment of: {headline}",
        system="One word.",
        id_column="id",
        model="gpt-4o-mini",
        provider="instant",
        dsn=dsn,
        max_tokens=5,
    )
    assert job.status().n_total == 4
    drain()
    results = job.results()
    assert list(results["custom_id"]) == ["a1", "b2", "c3", "d4"]
    assert list(results["id"]) == ["a1", "b2", "c3", "d4"]
    assert list(results["headline"]) == list(HEADLINES["headline"])
    assert list(results["n"]) == [1, 2, 3, 4]
    assert results["score"].isna().tolist() == [False, True, False, False]
    assert list(results["status"]) == ["succeeded"] * 4
    # The instant provider echoes the rendered prompt, which proves what was sent.
    assert results.loc[0, "response"] == "echo: One word. Sentiment of: Acme beats estimates"
    assert (results["prompt_tokens"] > 0).all() and (results["completion_tokens"] > 0).all()
    out = tmp_path / "out" / "results.parquet"
    assert job.to_parquet(out) == 4
    back = pq.read_table(out).to_pandas()
    assert list(back["response"]) == list(results["response"])
    if kind in ("dataframe", "arrow", "parquet"):
        assert str(back["day"].dtype).startswith("datetime64")


def test_messages_column(dsn: str, drain) -> None:
    frame = pd.DataFrame(
        {
            "messages": [
                [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
                json.dumps([{"role": "user", "content": "Hello"}]),
            ]
        }
    )
    job = batchdb.submit(frame, messages_column="messages", model="gpt-4o-mini", provider="instant", dsn=dsn)
    drain()
    assert list(job.results()["response"]) == ["echo: Be terse. Hi", "echo: Hello"]


def test_idempotency_key_returns_the_same_job(dsn: str, conn: psycopg.Connection) -> None:
    first = batchdb.submit(
        HEADLINES, prompt="{headline}", model="m", provider="instant", dsn=dsn, idempotency_key="backfill-2026-01"
    )
    again = batchdb.submit(
        HEADLINES, prompt="{headline}", model="m", provider="instant", dsn=dsn, idempotency_key="backfill-2026-01"
    )
    assert again.id == first.id
    assert conn.execute("SELECT count(*) AS n FROM batchdb.requests").fetchone()["n"] == 4


def assert_nothing_written(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"] == 0
    assert conn.execute("SELECT count(*) AS n FROM batchdb.requests").fetchone()["n"] == 0
    partitions = conn.execute(
        "SELECT count(*) AS n FROM pg_tables WHERE schemaname = 'batchdb' AND tablename ~ '^(requests|results)_[0-9]+$'"
    ).fetchone()["n"]
    assert partitions == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "Rate {title}"}, "refers to column(s) title which the data does not have"),
        ({"prompt": None}, "give a prompt template"),
        ({"prompt": "{headline}", "id_column": "nope"}, "column 'nope' not found"),
        ({"prompt": "{headline}", "provider": "acme"}, "provider: 'acme' is not one of"),
        ({"prompt": "{headline}", "model": " "}, "model: expected a model name"),
        ({"prompt": "{headline}", "budget_usd": -1}, "budget_usd: expected a positive amount"),
        ({"prompt": "{headline}", "temperature": 7}, "temperature: expected a number from 0 to 2"),
        ({"prompt": "Rate {0}"}, "positional field"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    kwargs: dict, message: str, dsn: str, conn: psycopg.Connection
) -> None:
    options = {"model": "gpt-4o-mini", "provider": "instant", **kwargs}
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batchdb.submit(HEADLINES, dsn=dsn, **options)
    assert_nothing_written(conn)


def test_bad_rows_are_refused_with_row_and_column(tmp_path: Path, dsn: str, conn: psycopg.Connection) -> None:
    cases: list[tuple[object, dict, str]] = []
    duplicate = HEADLINES.assign(id=["a1", "b2", "a1", "d4"])
    cases.append((duplicate, {"id_column": "id"}, "row 2, column 'id': id 'a1' appears twice"))
    null_id = HEADLINES.assign(id=["a1", None, "c3", "d4"])
    cases.append((null_id, {"id_column": "id"}, "row 1, column 'id': the id is empty"))
    nul = HEADLINES.assign(headline=["ok", "ok", "bad\x00byte", "ok"])
    cases.append((nul, {}, "row 2, column 'headline': contains a NUL character"))
    empty = HEADLINES.iloc[0:0]
    cases.append((empty, {}, "the data has no rows"))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("headline\nok\ncaf\xe9 au lait\n".encode("latin-1"))
    cases.append((latin1, {}, "line 3 is not valid UTF-8"))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"headline": "ok"}\n{"headline": "oops"\n')
    cases.append((broken, {}, "line 2 is not valid JSON"))
    cases.append((tmp_path / "missing.csv", {}, "no such file"))
    huge = pd.DataFrame({"headline": ["x" * 4_100_000]})
    cases.append((huge, {}, "row 0: 4,100,0"))
    for data, extra, message in cases:
        with pytest.raises(InputError) as refused:
            batchdb.submit(data, prompt="{headline}", model="gpt-4o-mini", provider="instant", dsn=dsn, **extra)
        assert message in str(refused.value), (message, str(refused.value))
        assert_nothing_written(conn)


def test_a_failure_late_in_a_large_input_leaves_nothing_behind(dsn: str, conn: psycopg.Connection) -> None:
    frame = pd.DataFrame({"id": [str(i) for i in range(120_000)], "headline": ["h"] * 120_000})
    frame.loc[110_000, "id"] = "5"  # duplicate id in the third batch
    with pytest.raises(InputError, match="row 110000, column 'id': id '5' appears twice"):
        batchdb.submit(frame, prompt="{headline}", id_column="id", model="m", provider="instant", dsn=dsn)
    assert_nothing_written(conn)


def test_an_unknown_model_is_refused_with_the_closest_names(dsn: str, conn: psycopg.Connection) -> None:
    with pytest.raises(InputError) as refused:
        batchdb.submit(HEADLINES, prompt="{headline}", model="gpt-4o-mni", dsn=dsn)
    message = str(refused.value)
    assert message.startswith(
        "model 'gpt-4o-mni': no price for openai/gpt-4o-mni in batchdb.prices; did you mean 'gpt-4o-mini' or "
    )
    assert "allow_unknown_model=True" in message
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"] == 0
    with pytest.raises(InputError, match=r"known gemini models: gemini-2\.0-flash, "):
        batchdb.submit(HEADLINES, prompt="{headline}", model="zzz", provider="gemini", dsn=dsn)


def test_an_allowed_unknown_model_shows_its_cost_as_unknown(dsn: str) -> None:
    job = batchdb.submit(HEADLINES, prompt="{headline}", model="my-finetune", allow_unknown_model=True, dsn=dsn)
    progress = job.status()
    assert not progress.priced
    assert progress.summary().endswith("0 tokens, cost unknown (no price for openai/my-finetune)")
    assert "$0" not in progress.summary()
    assert (
        batchdb.submit(HEADLINES, prompt="{headline}", model="gpt-4o-mini", dsn=dsn)
        .status()
        .summary()
        .endswith("$0.0000")
    )


def refusal(data: object, dsn: str, **options: object) -> str:
    with pytest.raises(InputError) as refused:
        batchdb.submit(data, prompt="{headline}", model="gpt-4o-mini", provider="instant", dsn=dsn, **options)
    return str(refused.value)


def test_a_malformed_csv_is_refused_with_its_line(tmp_path: Path, dsn: str, conn: psycopg.Connection) -> None:
    unterminated = tmp_path / "unterminated.csv"
    unterminated.write_text('id,headline\na1,"Acme beats estimates\nb2,Globex fined\n')
    assert refusal(unterminated, dsn) == (
        f"{unterminated}: line 2: a quoted value is never closed (the quote runs "
        "to the end of the file); close it, or double quotes inside a quoted "
        'value ("")'
    )
    stray = tmp_path / "stray.csv"
    stray.write_text('id,headline\na1,"ok"\nb2,"Acme" beats\n')
    assert refusal(stray, dsn).startswith(f"{stray}: line 3: malformed CSV (")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,headline\na1,ok\nb2,ok,extra\n")
    assert refusal(ragged, dsn) == f"{ragged}: line 3 has 3 field(s); the header has 2"
    assert_nothing_written(conn)


def test_a_huge_csv_row_gets_the_same_message_as_a_frame(tmp_path: Path, dsn: str) -> None:
    big = tmp_path / "big.csv"
    big.write_text("headline\nsmall\n" + "x" * 4_100_000 + "\nsmall\n")
    assert refusal(big, dsn) == f"{big}: line 3: 4,100,000 bytes of prompt data; at most 4,000,000 per row"
    # Just under the limit, but bigger than pyarrow's 1 MiB block: read, not "straddling object".
    fits = tmp_path / "fits.csv"
    fits.write_text("headline\nsmall\n" + "y" * 3_000_000 + "\n")
    assert batchdb.submit(fits, prompt="{headline}", model="m", provider="instant", dsn=dsn).status().n_total == 2


def test_duplicate_ids_name_both_rows_as_file_lines_or_positions(tmp_path: Path, dsn: str) -> None:
    frame = pd.DataFrame({"id": ["a1", "b2", "c3", "b2"], "headline": ["x", "two\nlines", "z", "w"]})
    assert refusal(frame, dsn, id_column="id").startswith("row 3, column 'id': id 'b2' appears twice (first at row 1)")
    source = tmp_path / "dupes.csv"
    frame.to_csv(source, index=False)  # the quoted two-line value puts row 3 on line 6
    assert refusal(source, dsn, id_column="id").startswith(
        f"{source}: line 6, column 'id': id 'b2' appears twice (first at line 3)"
    )
    jsonl = tmp_path / "dupes.jsonl"
    jsonl.write_text('{"id": "a1", "headline": "x"}\n\n{"id": "b2", "headline": "y"}\n{"id": "a1", "headline": "z"}\n')
    assert refusal(jsonl, dsn, id_column="id").startswith(
        f"{jsonl}: line 4, column 'id': id 'a1' appears twice (first at line 1)"
    )


def test_an_idempotency_key_reused_for_a_different_job_is_refused(
    tmp_path: Path, dsn: str, conn: psycopg.Connection
) -> None:
    def submit(data: object, **options: object) -> batchdb.Job:
        settings = {"prompt": "{headline}", "model": "gpt-4o-mini", "max_tokens": 5, **options}
        return batchdb.submit(data, provider="openai", dsn=dsn, idempotency_key="nightly", **settings)

    source = tmp_path / "rows.csv"
    HEADLINES.to_csv(source, index=False)
    first = submit(source)
    assert submit(source).id == first.id  # the same job, from the same file
    changed = HEADLINES.assign(headline=[*HEADLINES["headline"][:3], "Umbrella recalls"])
    changed_file = tmp_path / "changed.csv"
    changed.to_csv(changed_file, index=False)
    for data, options, differs in [
        (changed_file, {}, "data"),
        (source, {"model": "gpt-4o"}, "model"),
        (source, {"prompt": "Rate: {headline}"}, "prompt"),
        (source, {"max_tokens": 6, "temperature": 0.5}, "max_tokens, temperature"),
        (HEADLINES[["headline", "n"]], {}, "columns"),
    ]:
        with pytest.raises(InputError) as refused:
            submit(data, **options)
        assert str(refused.value) == (
            f"idempotency key 'nightly' was used for job {first.id} with different {differs}; submit with a new "
            f"key for a new job, or with the same data and options to get job {first.id} back"
        ), differs
    # How it runs is not what it is: a relaunch with another budget or priority gets its job back.
    assert submit(source, budget_usd=3, priority=2).id == first.id
    assert conn.execute("SELECT count(*) AS n FROM batchdb.jobs").fetchone()["n"] == 1


def test_every_arrow_type_is_stored_as_exact_json_and_comes_back_typed(
    dsn: str, conn: psycopg.Connection, drain
) -> None:
    """Each input row is stored as a JSON object: floats with every digit, dates as ISO text, decimals
    exact, nested values nested, NaN as null; results() restores the submitted column types."""
    import datetime
    import decimal

    table = pa.table(
        {
            "text": ['say "hi"\n', "é"],
            "f64": [0.1 + 0.2, float("nan")],
            "f32": pa.array([0.1, 1.0], pa.float32()),
            "i": pa.array([2**62, None], pa.int64()),
            "flag": [True, None],
            "ts": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5, 500000), None], pa.timestamp("us")),
            "day": [datetime.date(2026, 1, 2), None],
            "price": pa.array([decimal.Decimal("12345678901234567.89"), None], pa.decimal128(19, 2)),
            "tags": [["a", "b"], []],
            "meta": [{"k": 1, "v": "x"}, None],
            "kind": pa.array(["u", "v"]).dictionary_encode(),
            "nested": pa.array(
                [{"x": float("nan"), "y": [0.1]}, None],
                pa.struct([("x", pa.float64()), ("y", pa.list_(pa.float32()))]),
            ),
            "took": pa.array([datetime.timedelta(seconds=1.5), None], pa.duration("ms")),
        }
    )
    job = batchdb.submit(table, prompt="{text} {ts} {price}", model="m", provider="instant", dsn=dsn)
    stored = [
        r["input"]
        for r in conn.execute(
            "SELECT input::text AS input FROM batchdb.requests WHERE job_id = %s ORDER BY id", (job.id,)
        ).fetchall()
    ]
    first, second = (json.loads(s) for s in stored)
    assert first == {
        "text": 'say "hi"\n',
        "f64": 0.30000000000000004,
        "f32": 0.1,
        "i": 2**62,
        "flag": True,
        "ts": "2026-01-02 03:04:05.500000",
        "day": "2026-01-02",
        "price": "12345678901234567.89",
        "tags": ["a", "b"],
        "meta": {"k": 1, "v": "x"},
        "kind": "u",
        "nested": {"x": None, "y": [0.1]},  # NaN nested is null too; a float32 keeps its own digits
        "took": 1.5,  # seconds
    }
    assert second == {
        "text": "é",
        "f64": None,
        "f32": 1.0,
        "i": None,
        "flag": None,
        "ts": None,
        "day": None,
        "price": None,
        "tags": [],
        "meta": None,
        "kind": "v",
        "nested": None,
        "took": None,
    }
    drain()
    results = job.results()
    assert results.loc[0, "response"] == 'echo: say "hi"\n 2026-01-02 03:04:05.500000 12345678901234567.89'
    assert results.loc[0, "f64"] == 0.1 + 0.2
    assert results.loc[0, "i"] == 2**62 and str(results["ts"].dtype).startswith("datetime64")
