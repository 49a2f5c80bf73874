"""Read a caller's data and turn it into COPY-ready batches of request rows.

Sources: a pandas DataFrame, a pyarrow Table, or a path to CSV / JSONL /
Parquet. Data is read and converted in Arrow record batches, so a million
rows never sit in memory as Python objects. Every check that can refuse the
data names the row and the column: as the file's line number for CSV and
JSONL files, as the 0-based position for frames, tables and Parquet.
CSV is parsed strictly (an unterminated quote or a ragged row is refused with
its line), before pyarrow reads it.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring as _encode_string  # the C encoder, ensure_ascii=False
from pathlib import Path
from typing import Any, TypeAlias

import numpy
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from batchdb.errors import BatchDBError
from batchdb.prompts import PromptError, missing_columns, template_fields

BATCH_ROWS = 50_000
# A row larger than this (its input columns or messages as JSON) is refused: it cannot be one prompt.
MAX_ROW_BYTES = 4_000_000

DataSource: TypeAlias = pd.DataFrame | pa.Table | str | Path
# Names row `i` (0-based, in input order) for a message: "row 3", or "data.csv: line 5".
RowName = Callable[[int], str]


class InputError(BatchDBError, ValueError):
    """The data cannot be submitted; the message names the row and column."""


@dataclass(frozen=True, slots=True)
class InputSpec:
    prompt: str | None
    system: str | None
    messages_column: str | None
    id_column: str | None


@dataclass(frozen=True, slots=True)
class InputSchema:
    columns: list[str]
    types: dict[str, str]


def open_source(data: DataSource) -> tuple[pa.Schema, Iterator[pa.RecordBatch], RowName]:
    """The source's schema, an iterator of its record batches (checked for encoding), and its row names."""
    if isinstance(data, pd.DataFrame):
        table = _table_from_pandas(data)
        return table.schema, iter(table.to_batches(max_chunksize=BATCH_ROWS)), position
    if isinstance(data, pa.Table):
        return data.schema, iter(data.to_batches(max_chunksize=BATCH_ROWS)), position
    if isinstance(data, str | Path):
        return _open_path(Path(data))
    raise InputError(
        f"cannot submit data of type {type(data).__name__}; expected a pandas DataFrame, a pyarrow Table, "
        "or a path to a .csv, .jsonl or .parquet file"
    )


def position(row: int) -> str:
    """A frame's (or table's) row: its 0-based position."""
    return f"row {row}"


@dataclass(frozen=True, slots=True)
class FileLines:
    """A CSV or JSONL file's row named by the line it starts on, found by reading the file again.

    Only a refusal asks, so nothing per row is kept while the data streams in.
    """

    path: Path
    kind: str  # "csv" or "jsonl"

    def __call__(self, row: int) -> str:
        return f"{self.path}: line {self.line_of(row)}"

    def line_of(self, row: int) -> int:
        if self.kind == "jsonl":
            with self.path.open("rb") as handle:
                seen = -1
                for number, raw in enumerate(handle, start=1):
                    if raw.strip():
                        seen += 1
                        if seen == row:
                            return number
        else:
            for index, start, _ in _csv_records(self.path):
                if index == row:
                    return start
        raise IndexError(f"{self.path} has no row {row}")


@dataclass(frozen=True, slots=True)
class ParquetRows:
    path: Path

    def __call__(self, row: int) -> str:
        return f"{self.path}: row {row}"


def check_schema(schema: pa.Schema, spec: InputSpec) -> InputSchema:
    """Refuse a spec that does not fit the columns before any row is read."""
    names = list(schema.names)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"duplicate column name(s): {', '.join(dupes)}")
    if spec.messages_column is None and not spec.prompt:
        raise InputError("give a prompt template (prompt='... {column} ...') or messages_column='<column>'")
    if spec.messages_column is not None and spec.prompt:
        raise InputError("give either prompt= or messages_column=, not both")
    try:
        missing = missing_columns([spec.prompt, spec.system], names)
        for template in (spec.prompt, spec.system):
            if template:
                template_fields(template)
    except PromptError as exc:
        raise InputError(str(exc)) from None
    if missing:
        raise InputError(
            f"prompt template refers to column(s) {', '.join(sorted(set(missing)))} which the data does not have; "
            f"columns are: {', '.join(names) or '(none)'}"
        )
    for column in (spec.messages_column, spec.id_column):
        if column is not None and column not in names:
            raise InputError(f"column {column!r} not found; columns are: {', '.join(names) or '(none)'}")
    for field in schema:
        if pa.types.is_binary(field.type) or pa.types.is_large_binary(field.type):
            raise InputError(
                f"column {field.name!r} holds binary data ({field.type}); expected text, numbers, "
                "booleans, dates or nested JSON-like values"
            )
    input_columns = [n for n in names if n != spec.messages_column]
    return InputSchema(input_columns, {f.name: str(f.type) for f in schema if f.name in input_columns})


def copy_rows(
    batch: pa.RecordBatch,
    *,
    job_id: int,
    first_row: int,
    spec: InputSpec,
    input_columns: list[str],
    seen_ids: dict[str, int],
    name: RowName = position,
    dedupe: bool = True,
) -> CopyChunk:
    """One record batch as CSV for `COPY requests (job_id, custom_id, payload, input, request_key)`.

    `seen_ids` maps every id so far to its row, so a duplicate names both rows. With `dedupe`,
    each row's request_key is a hash of what its request is made of, so rows asking the same
    thing are sent once (sql/migrations/0019_send_each_distinct_request_once.sql).
    """
    n = batch.num_rows
    ids = custom_ids(batch, first_row, spec.id_column, seen_ids, name)
    encoded = _EncodedColumns(batch, first_row, name)
    inputs, payloads = _row_json(
        batch, first_row=first_row, spec=spec, input_columns=input_columns, name=name, encoded=encoded
    )
    keys = _request_keys(batch, payloads, spec, encoded) if dedupe else pa.nulls(n, pa.string())
    table = pa.table(
        {
            "job_id": pa.array([job_id] * n, pa.int64()),
            "custom_id": pa.array(ids, pa.string()),
            "payload": pa.array(payloads, pa.string()),
            "input": pa.array(inputs, pa.string()),
        }
    )
    return CopyChunk(_csv(table.append_column("request_key", keys)), _csv(table))


@dataclass(frozen=True, slots=True)
class CopyChunk:
    """Rows as COPY reads them, and what an idempotency key's fingerprint hashes: the rows without
    their request keys (derived from the rows, and absent before 0019), so the fingerprint of a job
    submitted by an earlier batchdb still matches."""

    csv: bytes
    fingerprint: bytes


def _csv(table: pa.Table) -> bytes:
    out = io.BytesIO()
    pa_csv.write_csv(table, out, pa_csv.WriteOptions(include_header=False, quoting_style="needed"))
    return out.getvalue()


def _request_keys(batch: pa.RecordBatch, payloads: pa.Array, spec: InputSpec, encoded: _EncodedColumns) -> pa.Array:
    """Per row, bytea text ('\\x' + hex) of a 16-byte hash of its payload and of the values its
    templates use. Within a job (one set of templates and parameters) equal keys mean equal
    requests; columns the templates do not use (an id) do not count.

    The values are the JSON object of the used columns in name order, joined from the columns
    already encoded for the rows' `input` (each column is encoded once per batch)."""
    fields = sorted({f for t in (spec.prompt, spec.system) if t for f in template_fields(t)} & set(batch.schema.names))
    used = encoded.objects(fields).to_pylist() if fields else [None] * batch.num_rows
    blake2b = hashlib.blake2b
    return pa.array(
        [
            "\\x" + blake2b(f"{payload or ''}\x1f{values or ''}".encode(), digest_size=16).hexdigest()
            for payload, values in zip(payloads.to_pylist(), used, strict=True)
        ],
        pa.string(),
    )


class _EncodedColumns:
    """A record batch's columns as JSON value texts, each encoded at most once however many
    objects (the row's `input`, the values its request key hashes) are joined from them."""

    def __init__(self, batch: pa.RecordBatch, first_row: int, row_name: RowName) -> None:
        self._batch = batch
        self._first_row = first_row
        self._row_name = row_name
        self._values: dict[str, pa.Array] = {}

    def objects(self, names: list[str]) -> pa.Array:
        """Each row as a JSON object of `names` (in that order), built column by column and joined by Arrow.

        Exact: floats keep every digit (their shortest round-trip repr; pandas' JSON
        writer rounds them), integers and booleans are Arrow's own text, timestamps
        and dates their ISO text ("2026-01-02 00:00:00"), decimals their exact digits
        as text, nested lists/structs/maps stay nested. NaN becomes null, as pandas
        treats it; an infinite number cannot be JSON and is refused naming its row.
        Each column is encoded once as an array of JSON texts and `binary_join_element_wise`
        stitches the rows, so no per-row dict is ever built.
        """
        if self._batch.num_rows == 0:
            return pa.array([], pa.string())
        parts: list[pa.Array | str] = []
        for position, column_name in enumerate(names):
            if column_name not in self._values:
                column = self._batch.column(column_name)
                self._values[column_name] = pc.fill_null(
                    _json_values(column, column_name, self._first_row, self._row_name), "null"
                )
            parts.append(("{" if position == 0 else ",") + _encode_string(column_name) + ":")
            parts.append(self._values[column_name])
        parts.append("}")
        return pc.binary_join_element_wise(*parts, "")


def request_parts(
    batch: pa.RecordBatch, *, first_row: int, spec: InputSpec, input_columns: list[str], name: RowName = position
) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None, str]]:
    """Each row's (payload, input) exactly as a worker reads them back from batchdb.requests,
    checked as submit checks them, and its request key as submit stores it: what `batchdb estimate`
    renders prompts from and counts distinct requests by."""
    encoded = _EncodedColumns(batch, first_row, name)
    inputs, payloads = _row_json(
        batch, first_row=first_row, spec=spec, input_columns=input_columns, name=name, encoded=encoded
    )
    keys = _request_keys(batch, payloads, spec, encoded)
    for payload, values, key in zip(payloads.to_pylist(), inputs.to_pylist(), keys.to_pylist(), strict=True):
        yield (None if payload is None else json.loads(payload)), (None if values is None else json.loads(values)), key


def _row_json(
    batch: pa.RecordBatch,
    *,
    first_row: int,
    spec: InputSpec,
    input_columns: list[str],
    name: RowName,
    encoded: _EncodedColumns | None = None,
) -> tuple[pa.Array, pa.Array]:
    """The rows' `input` and `payload` JSON texts, refused with the row named if one cannot be stored."""
    n = batch.num_rows
    _refuse_nul(batch, first_row, name)
    encoded = encoded or _EncodedColumns(batch, first_row, name)
    inputs = encoded.objects(input_columns) if input_columns else pa.nulls(n, pa.string())
    payloads = pa.nulls(n, pa.string())
    if spec.messages_column is not None:
        values = batch.column(spec.messages_column).to_pylist()
        payloads = pa.array(
            [_messages_payload(v, first_row + i, spec.messages_column, name) for i, v in enumerate(values)], pa.string()
        )
    sizes = pc.add(pc.fill_null(pc.binary_length(inputs), 0), pc.fill_null(pc.binary_length(payloads), 0))
    if n and pc.max(sizes).as_py() > MAX_ROW_BYTES:
        row = pc.index(pc.greater(sizes, MAX_ROW_BYTES), True).as_py()
        raise InputError(
            f"{name(first_row + row)}: {sizes[row].as_py():,} bytes of prompt data; at most {MAX_ROW_BYTES:,} per row"
        )
    return inputs, payloads


# -- reading -----------------------------------------------------------------------------------


def _open_path(path: Path) -> tuple[pa.Schema, Iterator[pa.RecordBatch], RowName]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            parquet = pq.ParquetFile(path)
            return parquet.schema_arrow, parquet.iter_batches(batch_size=BATCH_ROWS), ParquetRows(path)
        if suffix == ".csv":
            _check_utf8(path)
            biggest = _check_csv(path)
            # A block must hold the largest row whole (pyarrow's default 1 MiB block refuses bigger rows
            # with "straddling object straddles two block boundaries").
            block = max(1 << 20, 2 * biggest + (1 << 16))
            table = pa_csv.read_csv(
                path,
                read_options=pa_csv.ReadOptions(block_size=block),
                parse_options=pa_csv.ParseOptions(newlines_in_values=True),
                convert_options=pa_csv.ConvertOptions(strings_can_be_null=False),
            )
            return table.schema, iter(table.to_batches(max_chunksize=BATCH_ROWS)), FileLines(path, "csv")
        if suffix in (".jsonl", ".ndjson", ".json"):
            table = _read_jsonl(path)
            return table.schema, iter(table.to_batches(max_chunksize=BATCH_ROWS)), FileLines(path, "jsonl")
    except InputError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as {suffix[1:]}: {exc}") from None
    raise InputError(f"{path}: unsupported file type {suffix or '(none)'}; expected .csv, .jsonl or .parquet")


def _csv_records(path: Path) -> Iterator[tuple[int, int, list[str]]]:
    """(0-based row, line it starts on, fields) of every data row; the header and blank lines are skipped.

    Python's csv module in strict mode: it raises csv.Error for what pyarrow would
    silently accept (a quote never closed swallows the rest of the file as one value).
    """
    _raise_csv_field_limit()
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, strict=True)
        end = 0
        row = -1
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields:
                continue
            if row >= 0:
                yield row, start, fields
            row += 1


def _check_csv(path: Path) -> int:
    """Refuse a malformed CSV with its line number; returns the largest row's size in bytes (at most)."""
    width = None
    biggest = 0
    end = 0  # the line the last complete row ended on
    _raise_csv_field_limit()
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, strict=True)
            for fields in reader:
                start, end = end + 1, reader.line_num
                if not fields:
                    continue
                if width is None:
                    width = len(fields)
                    continue
                if len(fields) != width:
                    raise InputError(f"{path}: line {start} has {len(fields)} field(s); the header has {width}")
                chars = sum(map(len, fields))
                if 4 * chars > MAX_ROW_BYTES:  # possibly too big: count its bytes
                    size = sum(len(f.encode()) for f in fields)
                    if size > MAX_ROW_BYTES:
                        raise InputError(
                            f"{path}: line {start}: {size:,} bytes of prompt data; at most {MAX_ROW_BYTES:,} per row"
                        )
                    biggest = max(biggest, size)
                else:
                    biggest = max(biggest, 4 * chars)
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise InputError(
                f"{path}: line {end + 1}: a quoted value is never closed (the quote runs to the end "
                'of the file); close it, or double quotes inside a quoted value ("")'
            ) from None
        if "field larger than field limit" in str(exc):
            raise InputError(
                f"{path}: line {end + 1}: a value of more than {csv.field_size_limit():,} characters; "
                f"at most {MAX_ROW_BYTES:,} bytes of prompt data per row"
            ) from None
        raise InputError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    return biggest + (width or 0) * 3


def _raise_csv_field_limit() -> None:
    """The csv module refuses fields over 128 KiB by default; a row may hold up to MAX_ROW_BYTES."""
    limit = 4 * MAX_ROW_BYTES + 1  # no field this long can fit, whatever its encoding
    if csv.field_size_limit() < limit:
        csv.field_size_limit(limit)


def _check_utf8(path: Path) -> None:
    line = 1
    with path.open("rb") as handle:
        carry = b""
        while chunk := handle.read(1 << 20):
            data = carry + chunk
            try:
                data.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.start >= len(data) - 3 and exc.reason == "unexpected end of data":
                    carry = data[exc.start :]  # a character split across chunks
                    data = data[: exc.start]
                else:
                    bad_line = line + data[: exc.start].count(b"\n")
                    raise InputError(
                        f"{path}: line {bad_line} is not valid UTF-8 (byte 0x{data[exc.start]:02x}); "
                        "save the file as UTF-8"
                    ) from None
            line += data.count(b"\n")
    if carry:
        raise InputError(f"{path}: line {line} ends in a truncated UTF-8 character")


def _read_jsonl(path: Path) -> pa.Table:
    rows: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}: line {number} is not valid UTF-8") from None
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {number} is not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(value, dict):
                raise InputError(f"{path}: line {number} must be a JSON object, got {type(value).__name__}")
            rows.append(value)
    if not rows:
        return pa.table({})
    return _table_from_pandas(pd.DataFrame.from_records(rows))


def _table_from_pandas(frame: pd.DataFrame) -> pa.Table:
    """Arrow table of a frame; a column mixing types (lists and strings, say) is kept as JSON text."""
    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    frame = frame.copy()
    for column in frame.columns:
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            try:
                frame[column] = [
                    v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in frame[column]
                ]
            except (TypeError, ValueError) as exc:
                raise InputError(f"column {column!r}: values cannot be stored ({exc})") from None
    try:
        return pa.Table.from_pandas(frame, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"data cannot be converted: {exc}") from None


class _Lazy:
    """A row's name, found only if a message is formatted (a file's line means reading the file again)."""

    def __init__(self, name: RowName, row: int) -> None:
        self._name, self._row = name, row

    def __format__(self, spec: str) -> str:
        return format(self._name(self._row), spec)


# -- converting --------------------------------------------------------------------------------


def _refuse_nul(batch: pa.RecordBatch, first_row: int, name: RowName) -> None:
    for column_name, column in zip(batch.schema.names, batch.columns, strict=True):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            has_nul = pc.match_substring(column, "\x00")
            if pc.any(has_nul).as_py():
                row = pc.index(has_nul, True).as_py()
                raise InputError(
                    f"{name(first_row + row)}, column {column_name!r}: contains a NUL character, "
                    "which PostgreSQL text cannot hold"
                )


def custom_ids(
    batch: pa.RecordBatch, first_row: int, id_column: str | None, seen: dict[str, int], name: RowName
) -> list[str]:
    """Each row's custom_id (its `id_column` value, else its position), refusing an empty or repeated
    id with both rows named; `seen` carries the ids of earlier batches."""
    if id_column is None:
        return [str(first_row + i) for i in range(batch.num_rows)]
    values = batch.column(id_column).to_pylist()
    ids = []
    for i, value in enumerate(values):
        if value is None or (isinstance(value, float) and value != value):
            raise InputError(f"{name(first_row + i)}, column {id_column!r}: the id is empty; every row needs an id")
        text = str(value)
        first = seen.setdefault(text, first_row + i)
        if first != first_row + i:
            where = name(first)
            raise InputError(
                f"{name(first_row + i)}, column {id_column!r}: id {text!r} appears twice (first at "
                f"{where.rsplit(': ', 1)[-1]}); ids must be unique"
            )
        ids.append(text)
    return ids


def _json_values(column: pa.Array, name: str, first_row: int, row_name: RowName) -> pa.Array:
    """`column`'s values as JSON texts (null stays null)."""
    kind = column.type
    if pa.types.is_dictionary(kind):  # pandas categoricals
        return _json_values(column.dictionary_decode(), name, first_row, row_name)
    if pa.types.is_null(kind):
        return pa.nulls(len(column), pa.string())
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        return pc.cast(column, pa.string())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return pa.array([None if v is None else _encode_string(v) for v in column.to_pylist()], pa.string())
    if pa.types.is_floating(kind):
        infinite = pc.is_inf(column)
        if pc.any(infinite).as_py():
            row = pc.index(infinite, True).as_py()
            raise InputError(
                f"{row_name(first_row + row)}, column {name!r}: {column[row].as_py()} "
                "cannot be stored as JSON; use a finite number or null"
            )
        # NumPy's str() of a float32/float64 is the shortest text that reads back as the same
        # number in that width ("0.1", "1.0"); NaN and null both become JSON null.
        values = column.to_numpy(zero_copy_only=False)
        return pa.array([None if v != v else str(v) for v in values], pa.string())
    texts: list[str | None] = []
    for row, value in enumerate(column.to_pylist()):
        if value is None:
            texts.append(None)
            continue
        try:
            texts.append(
                json.dumps(
                    _plain(value, kind), ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_text
                )
            )
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{row_name(first_row + row)}, column {name!r}: cannot be stored as JSON ({exc}); "
                "use text, numbers, dates, lists or structs"
            ) from None
    return pa.array(texts, pa.string())


def _plain(value: Any, kind: pa.DataType) -> Any:
    """A map's (key, value) pairs as an object, recursively; a nested float as at the top level
    (NaN as null, a float32 by its own shortest text); everything else as it is."""
    if value is None:
        return None
    if pa.types.is_floating(kind):
        if value != value:  # NaN
            return None
        return float(str(numpy.float32(value))) if kind.bit_width < 64 else value
    if pa.types.is_map(kind):
        return {str(k): _plain(v, kind.item_type) for k, v in value}
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return [_plain(v, kind.value_type) for v in value]
    if pa.types.is_struct(kind):
        return {field.name: _plain(value[field.name], field.type) for field in kind}
    return value


def _json_text(value: Any) -> str | float:
    """What `json` cannot write itself: dates and times as ISO text, decimals as exact digits (text),
    durations as a number of seconds. (Binary columns are refused before this, by check_schema.)"""
    if isinstance(value, datetime.datetime | datetime.date | datetime.time | decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not a JSON type")


def _messages_payload(value: Any, row_index: int, column: str, name: RowName) -> str:
    row = _Lazy(name, row_index)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(
                f"{row}, column {column!r}: expected a list of messages "
                '[{"role": ..., "content": ...}] or its JSON text'
            ) from None
    if not isinstance(value, list) or not value:
        raise InputError(f"{row}, column {column!r}: expected a non-empty list of messages, got {type(value).__name__}")
    for position, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(
                f"{row}, column {column!r}: message {position} must be an object with 'role' and 'content'"
            )
        if message["role"] not in ("system", "user", "assistant", "developer"):
            raise InputError(
                f"{row}, column {column!r}: message {position} has role {message['role']!r}; "
                "expected system, user, assistant or developer"
            )
    return json.dumps({"messages": value}, ensure_ascii=False)
