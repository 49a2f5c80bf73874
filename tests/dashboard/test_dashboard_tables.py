"""dashboard/tables.py: a wide table's columns are fitted, or cut into parts, so that each part fits its frame."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from batchdb.dashboard import tables
from batchdb.dashboard.tables import fit_columns, split_columns

CONFIG = {
    "job_id": st.column_config.NumberColumn("job", format="%d"),
    "note": "note",
    "pct": st.column_config.ProgressColumn("progress", min_value=0, max_value=100),
}


def frame(n_numbers: int, note: str = "x" * 300) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "job_id": [1, 22],
            "name": ["alpha", "beta"],
            "note": [note, "short"],
            "pct": [10.0, 100.0],
            **{f"count_{i}": [123456, 7] for i in range(n_numbers)},
        }
    )


def widths(config: dict, columns: list[str]) -> int:
    return sum(config[c]["width"] for c in columns)


def _width(data: pd.DataFrame, config: dict, column: str) -> float:
    set_width = config[column].get("width") if isinstance(config.get(column), dict) else None
    return set_width or tables._natural_width(data[column], config.get(column))


def test_a_table_that_fits_is_left_alone() -> None:
    data = frame(2, note="short")
    assert fit_columns(data, CONFIG, 1000) == CONFIG


def test_a_long_text_column_gives_way_and_numbers_keep_their_width() -> None:
    data = frame(3)
    fitted = fit_columns(data, CONFIG, 600)
    assert widths(fitted, list(data.columns)) <= 600
    assert fitted["count_0"]["width"] >= 7 * len("count_0") and fitted["note"]["width"] < 300
    assert fitted["job_id"]["label"] == "job" and fitted["job_id"]["type_config"]["format"] == "%d"
    assert fitted["name"]["label"] == "name"


def test_too_many_columns_are_cut_into_parts_each_repeating_the_keys_and_fitting() -> None:
    data = frame(20)
    parts = split_columns(data, CONFIG, 1000, keys=["job_id", "name"])
    assert len(parts) > 1
    assert all(part[:2] == ["job_id", "name"] for part in parts)
    rest = [c for part in parts for c in part[2:]]
    assert sorted(rest) == sorted(c for c in data.columns if c not in ("job_id", "name"))
    for part in parts:  # explicit widths, or natural ones well inside the frame
        fitted = fit_columns(data, CONFIG, 1000, part)
        assert sum(_width(data, fitted, c) for c in part) <= 1000
    assert split_columns(frame(2, note="short"), CONFIG, 1000) == [list(frame(2).columns)]
