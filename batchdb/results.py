"""Read a job's results back: input columns + response, status, usage, error.

Rows stream from a server-side cursor in chunks and are converted to Arrow
record batches, so writing a million-row job to a file never holds the whole
job in memory. The file's format follows its extension (`FORMATS`); any other
extension is refused rather than guessed, so `-o x.json` never holds Parquet.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from batchdb.db import connect
from batchdb.errors import BatchDBError
from batchdb.queries import query

CHUNK_ROWS = 20_000
# Parquet key-value metadata naming the job a file holds, so readers (the dashboard) find a job's
# file whatever it is called (`<asset>/<partition>.parquet` for Dagster).
JOB_ID_METADATA = b"batchdb.job_id"

OUTPUT_SCHEMA = pa.schema(
    [
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
        # Columns added later go last, so files written before keep their column order.
        # Of prompt_tokens, those the provider served from its prompt cache.
        ("cached_tokens", pa.int64()),
        # The custom_id of the earlier identical row whose answer this one took (no call of its own).
        ("duplicate_of", pa.string()),
        # The job and request id of the stored answer this row reused at $0 (submit(reuse="exact")).
        ("reused_from_job", pa.int64()),
        ("reused_from", pa.int64()),
    ]
)


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


class UnsupportedFormat(BatchDBError, ValueError):
    """The output file's extension names no format batchdb writes."""


def writer_for(path: Path) -> Callable[..., int]:
    """The writer of `path`'s extension; raises UnsupportedFormat naming the ones there are."""
    writer = FORMATS.get(path.suffix.lower())
    if writer is None:
        known = ", ".join(FORMATS)
        raise UnsupportedFormat(
            f"cannot write {path.name}: unknown extension {path.suffix or '(none)'!r}; "
            f"name the file with one of {known}"
        )
    return writer


def write_file(job_id: int, path: Path, *, dsn: str | None = None) -> int:
    """Write the job's results in the format of `path`'s extension; returns rows written."""
    return writer_for(path)(job_id, path, dsn=dsn)


def write_parquet(job_id: int, path: Path, *, dsn: str | None = None) -> int:
    """Write atomically: a temp file in the same folder, renamed when complete."""
    written = 0
    with _atomic(path) as tmp_name:
        writer: pq.ParquetWriter | None = None
        try:
            tag = {JOB_ID_METADATA: str(job_id).encode()}
            for batch in iter_batches(job_id, dsn=dsn):
                if writer is None:
                    writer = pq.ParquetWriter(tmp_name, batch.schema.with_metadata(tag))
                writer.write_batch(_conform(batch, writer.schema))
                written += batch.num_rows
            if writer is None:
                pq.write_table(OUTPUT_SCHEMA.with_metadata(tag).empty_table(), tmp_name)
        finally:
            if writer is not None:
                writer.close()
    return written


def write_csv(job_id: int, path: Path, *, dsn: str | None = None) -> int:
    """CSV with a header row, one line per request (pandas' formatting, batch by batch)."""
    written = 0
    with _atomic(path) as tmp_name, open(tmp_name, "w", newline="", encoding="utf-8") as out:
        schema: pa.Schema | None = None
        for batch in iter_batches(job_id, dsn=dsn):
            schema = schema or batch.schema
            _conform(batch, schema).to_pandas().to_csv(out, index=False, header=written == 0)
            written += batch.num_rows
        if schema is None:
            OUTPUT_SCHEMA.empty_table().to_pandas().to_csv(out, index=False)
    return written


def write_jsonl(job_id: int, path: Path, *, dsn: str | None = None) -> int:
    """One JSON object per line (the same columns as the Parquet file; dates as ISO strings)."""
    written = 0
    with _atomic(path) as tmp_name, open(tmp_name, "w", encoding="utf-8") as out:
        for batch in iter_batches(job_id, dsn=dsn):
            for record in batch.to_pylist():
                out.write(json.dumps(record, ensure_ascii=False, default=_json_default))
                out.write("\n")
            written += batch.num_rows
    return written


FORMATS: dict[str, Callable[..., int]] = {
    ".parquet": write_parquet,
    ".pq": write_parquet,
    ".csv": write_csv,
    ".jsonl": write_jsonl,
    ".ndjson": write_jsonl,
}


@contextmanager
def _atomic(path: Path) -> Iterator[str]:
    """A temp file next to `path`, renamed over it only when the body finished.

    mkstemp creates files 0600; the result gets the mode any new file of this user gets
    (0666 minus the umask, 0644 usually), so a colleague or a service can read it as usual.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _umask() -> int:
    try:  # Linux says it without changing it (os.umask would, for every thread, for a moment)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


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
    arrays["cached_tokens"] = pa.array([r["cached_tokens"] for r in rows], pa.int64())
    arrays["duplicate_of"] = pa.array([r["duplicate_of"] for r in rows], pa.string())
    arrays["reused_from_job"] = pa.array([r["reused_from_job"] for r in rows], pa.int64())
    arrays["reused_from"] = pa.array([r["reused_from"] for r in rows], pa.int64())
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
        "string": pa.string(),
        "large_string": pa.large_string(),
        "bool": pa.bool_(),
        "int8": pa.int8(),
        "int16": pa.int16(),
        "int32": pa.int32(),
        "int64": pa.int64(),
        "uint8": pa.uint8(),
        "uint16": pa.uint16(),
        "uint32": pa.uint32(),
        "uint64": pa.uint64(),
        "float": pa.float32(),
        "double": pa.float64(),
        "halffloat": pa.float16(),
        "date32[day]": pa.date32(),
        "date64[ms]": pa.date64(),
    }
    if name in simple:
        return simple[name]
    if name.startswith("timestamp["):
        unit_tz = name[len("timestamp[") : -1].split(", tz=")
        return pa.timestamp(unit_tz[0], tz=unit_tz[1] if len(unit_tz) > 1 else None)
    return None


def _unify(batches: list[pa.RecordBatch]) -> list[pa.RecordBatch]:
    schema = pa.unify_schemas([b.schema for b in batches], promote_options="permissive")
    return [_conform(b, schema) for b in batches]


def job_id_of(path: str | os.PathLike[str]) -> int | None:
    """The job a Parquet file written by batchdb holds (its footer's metadata), or None."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return int(metadata[JOB_ID_METADATA])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


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
