"""Read a job's results back: input columns + response, status, usage, error.

Rows stream from a server-side cursor in chunks and are converted to Arrow
record batches, so writing a million-row job to Parquet never holds the whole
job in memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchdb.db import connect
from batchdb.queries import query

CHUNK_ROWS = 20_000

OUTPUT_SCHEMA = pa.schema([
    ("custom_id", pa.string()),
    ("status", pa.string()),
    ("response", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
    ("attempts", pa.int64()),
    ("error_class", pa.string()),
    ("error", pa.string()),
    ("latency_ms", pa.int64()),
])


def iter_batches(job_id: int, *, dsn: str | None = None, chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.RecordBatch]:
    with connect(dsn, autocommit=False) as conn:
        job = conn.execute(query("job_for_worker"), {"job_id": job_id}).fetchone()
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        params = job["params"] or {}
        columns: list[str] = list(params.get("input_columns") or [])
        types: dict[str, str] = dict(params.get("input_types") or {})
        with conn.cursor(name=f"batchdb_results_{job_id}") as cur:
            cur.itersize = chunk_rows
            cur.execute(query("job_results"), {"job_id": job_id})
            while rows := cur.fetchmany(chunk_rows):
                yield _to_batch(rows, columns, types)


def read_dataframe(job_id: int, *, dsn: str | None = None) -> pd.DataFrame:
    batches = list(iter_batches(job_id, dsn=dsn))
    if not batches:
        return OUTPUT_SCHEMA.empty_table().to_pandas()
    return pa.Table.from_batches(_unify(batches)).to_pandas()


def write_parquet(job_id: int, path: Path, *, dsn: str | None = None) -> int:
    """Write atomically: a temp file in the same folder, renamed when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    written = 0
    writer: pq.ParquetWriter | None = None
    try:
        for batch in iter_batches(job_id, dsn=dsn):
            if writer is None:
                writer = pq.ParquetWriter(tmp_name, batch.schema)
            writer.write_batch(_conform(batch, writer.schema))
            written += batch.num_rows
        if writer is None:
            pq.write_table(OUTPUT_SCHEMA.empty_table(), tmp_name)
        else:
            writer.close()
            writer = None
        os.replace(tmp_name, path)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return written


def _to_batch(rows: list[dict[str, Any]], columns: list[str], types: dict[str, str]) -> pa.RecordBatch:
    inputs = [r["input"] or {} for r in rows]
    if not columns:
        seen: dict[str, None] = {}
        for item in inputs:
            seen.update(dict.fromkeys(item))
        columns = list(seen)
    output_names = set(OUTPUT_SCHEMA.names)
    arrays: dict[str, pa.Array] = {}
    for column in columns:
        name = f"input_{column}" if column in output_names else column
        arrays[name] = _input_array([item.get(column) for item in inputs], types.get(column))
    arrays["custom_id"] = pa.array([r["custom_id"] for r in rows], pa.string())
    arrays["status"] = pa.array([r["status"] for r in rows], pa.string())
    arrays["response"] = pa.array([r["response_text"] for r in rows], pa.string())
    arrays["finish_reason"] = pa.array([r["finish_reason"] for r in rows], pa.string())
    arrays["prompt_tokens"] = pa.array([r["prompt_tokens"] for r in rows], pa.int64())
    arrays["completion_tokens"] = pa.array([r["completion_tokens"] for r in rows], pa.int64())
    arrays["cost_usd"] = pa.array([float(r["cost_usd"]) for r in rows], pa.float64())
    arrays["attempts"] = pa.array([r["attempts"] for r in rows], pa.int64())
    arrays["error_class"] = pa.array([r["error_class"] for r in rows], pa.string())
    arrays["error"] = pa.array([r["error"] for r in rows], pa.string())
    arrays["latency_ms"] = pa.array([r["latency_ms"] for r in rows], pa.int64())
    return pa.RecordBatch.from_pydict(arrays)


def _input_array(values: list[Any], type_name: str | None) -> pa.Array:
    """Values came back from JSON; restore the submitted column type where Arrow can."""
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        array = pa.array([None if v is None else str(v) for v in values], pa.string())
    if type_name:
        try:
            target = _parse_type(type_name)
            if target is not None and array.type != target:
                array = array.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
            pass
    return array


def _parse_type(name: str) -> pa.DataType | None:
    simple = {
        "string": pa.string(), "large_string": pa.large_string(), "bool": pa.bool_(),
        "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
        "uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32(), "uint64": pa.uint64(),
        "float": pa.float32(), "double": pa.float64(), "halffloat": pa.float16(),
        "date32[day]": pa.date32(), "date64[ms]": pa.date64(),
    }
    if name in simple:
        return simple[name]
    if name.startswith("timestamp["):
        unit_tz = name[len("timestamp["):-1].split(", tz=")
        return pa.timestamp(unit_tz[0], tz=unit_tz[1] if len(unit_tz) > 1 else None)
    return None


def _unify(batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    schema = pa.unify_schemas([b.schema for b in batches], promote_options="permissive")
    return [_conform(b, schema) for b in batches]


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    arrays = []
    for field in schema:
        if field.name in batch.schema.names:
            column = batch.column(field.name)
            arrays.append(column if column.type == field.type else column.cast(field.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)

