"""Column widths (and, if need be, a second table) that let a table's every column show in its frame.

Streamlit sizes each column of `st.dataframe` to its header and content; a table whose columns add
up to more than its frame scrolls sideways, and its right-hand columns are simply cut off on screen
(at a 1,400 px window the Jobs table showed 13 of its 20 columns). `fit_columns` estimates each
column's natural width and, when the sum is over the frame, gives every column an explicit width:
numbers, flags and bars keep theirs (they are short and must stay readable), text columns share
what is left (a long name or error is cut with an ellipsis in its cell and readable in full on
click), and if that is still too wide everything shrinks in proportion. `split_columns` first cuts a
table with more columns than fit at a readable width into parts shown one under the other, each
repeating the row's key columns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

# Measured on Streamlit 1.67's grid (14 px Source Sans): about 7 px a character, 16 px of padding.
CHAR_PX = 7.0
PAD_PX = 18.0
MIN_TEXT_PX = 70
MIN_ANY_PX = 44
PROGRESS_PX = 120
READABLE_TEXT_PX = 160
MAX_SAMPLE_ROWS = 200
# The estimate is within a few percent: a table estimated this close to its frame is fitted exactly.
SAFETY = 0.9
# A table up to this much over its frame is narrowed rather than cut in two.
SQUEEZE = 1.12


def fit_columns(
    data: pd.DataFrame, column_config: Mapping[str, Any] | None, frame_px: float, columns: Sequence[str] | None = None
) -> dict[str, Any]:
    """`column_config` with a pixel width for every shown column when their natural widths come near
    `frame_px` (explicit widths add up exactly); unchanged (as a new dict) when they clearly fit."""
    config: dict[str, Any] = dict(column_config or {})
    shown = [c for c in (columns or list(data.columns)) if c in data.columns and config.get(c, "") is not None]
    natural = {c: _natural_width(data[c], config.get(c)) for c in shown}
    if not shown or sum(natural.values()) <= frame_px * SAFETY:
        return config
    fixed = {c: w for c, w in natural.items() if not _is_text(data[c], config.get(c))}
    text = [c for c in shown if c not in fixed]
    widths = dict(fixed)
    room = frame_px - sum(fixed.values())
    if text:
        share = _share(room, [natural[c] for c in text])
        widths.update({c: w for c, w in zip(text, share, strict=True)})
    total = sum(widths.values())
    if total > frame_px:  # even the short columns are too many: everything narrower, in proportion
        scale = frame_px / total
        widths = {c: max(MIN_ANY_PX, math.floor(w * scale)) for c, w in widths.items()}
    for column in shown:
        config[column] = _with_width(config.get(column), column, int(widths[column]))
    return config


def split_columns(
    data: pd.DataFrame,
    column_config: Mapping[str, Any] | None,
    frame_px: float,
    columns: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
) -> list[list[str]]:
    """The shown columns in parts that each fit `frame_px` at a readable width (one part when they
    all do), every part starting with the `keys` columns (default: the leading text columns, at most
    three, else the first column)."""
    config = dict(column_config or {})
    shown = [c for c in (columns or list(data.columns)) if c in data.columns and config.get(c, "") is not None]
    readable = {
        c: (
            min(_natural_width(data[c], config.get(c)), READABLE_TEXT_PX)
            if _is_text(data[c], config.get(c))
            else _natural_width(data[c], config.get(c))
        )
        for c in shown
    }
    if sum(readable.values()) <= frame_px * SQUEEZE:
        return [shown]  # fit_columns narrows it a little
    if keys is None:
        keys = []
        for c in shown[:3]:
            if not _is_text(data[c], config.get(c)):
                break
            keys.append(c)
        keys = keys or shown[:1]
    keys = [c for c in keys if c in shown]
    rest = [c for c in shown if c not in keys]
    room = max(frame_px - sum(readable[c] for c in keys), 1.0)
    target = sum(readable[c] for c in rest) / math.ceil(sum(readable[c] for c in rest) / room)  # balanced parts
    parts: list[list[str]] = []
    part: list[str] = []
    used = 0.0
    for column in rest:
        if part and (used + readable[column] > room or used >= target):
            parts.append([*keys, *part])
            part, used = [], 0.0
        part.append(column)
        used += readable[column]
    if part:
        parts.append([*keys, *part])
    return parts


def _share(room: float, wanted: list[float]) -> list[float]:
    """Split `room` among text columns: narrow ones keep their width, the widest give way (water-filling)."""
    widths = [0.0] * len(wanted)
    order = sorted(range(len(wanted)), key=lambda i: wanted[i])
    left, count = max(room, MIN_TEXT_PX * len(wanted)), len(wanted)
    for i in order:
        fair = left / count
        widths[i] = max(MIN_TEXT_PX, math.floor(min(wanted[i], fair)))
        left -= widths[i]
        count -= 1
    return widths


def _label(config: Any, column: str) -> str:
    if isinstance(config, str):
        return config
    if isinstance(config, Mapping) and config.get("label"):
        return str(config["label"])
    return column


def _kind(config: Any) -> str | None:
    if isinstance(config, Mapping):
        return (config.get("type_config") or {}).get("type")
    return None


def _is_text(values: pd.Series, config: Any) -> bool:
    kind = _kind(config)
    if kind in ("number", "progress", "checkbox", "link", "datetime", "date", "time"):
        return False
    return not (
        pd.api.types.is_numeric_dtype(values)
        or pd.api.types.is_bool_dtype(values)
        or pd.api.types.is_datetime64_any_dtype(values)
    )


def _natural_width(values: pd.Series, config: Any) -> float:
    header = len(_label(config, str(values.name))) + 2  # the header's sort/menu affordance
    kind = _kind(config)
    if kind == "progress":
        return max(PROGRESS_PX, header * CHAR_PX + PAD_PX)
    if kind == "link":
        text = (config.get("type_config") or {}).get("display_text") or ""
        return max(len(text), header) * CHAR_PX + PAD_PX
    sample = values.head(MAX_SAMPLE_ROWS)
    if pd.api.types.is_bool_dtype(sample):
        content = 3
    elif pd.api.types.is_datetime64_any_dtype(sample):
        content = 19
    elif pd.api.types.is_numeric_dtype(sample):
        fmt = ((config or {}).get("type_config") or {}).get("format") if isinstance(config, Mapping) else None
        content = max((len(_number(v, fmt)) for v in sample.dropna()), default=4)
    else:
        content = max((len(str(v)) for v in sample.dropna()), default=4)
    return max(content, header) * CHAR_PX + PAD_PX


def _number(value: Any, fmt: str | None) -> str:
    if fmt and "%" in fmt:
        try:
            return str(fmt % value)
        except (TypeError, ValueError):
            pass
    return f"{value:,}" if isinstance(value, int) else f"{float(value):,.4g}"


def _with_width(config: Any, column: str, width: int) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return {**config, "width": width}
    return {"label": config if isinstance(config, str) else column, "width": width}
