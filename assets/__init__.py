"""Dagster definitions: partitioned LLM batch assets that submit one batchdb job per partition.

- `llm_batch_asset(...)`: declare an asset that sends each partition of an upstream asset through
  an LLM as one batchdb job and writes the answers to Parquet.
- `BatchDBResource`: the resource behind it, for ordinary `@dg.asset` functions (`run`, or
  `submit` / `wait` / `cancel` / `output_path` one by one).
- `rows_answered_check(asset)`: the asset check `BatchDBResource.run` reports on.

`batchdb.dagster.example` is the example code location (`workspace.yaml`); `batchdb.dagster.dev` starts it with
workers and the provider simulator (`batchdb dagster`).
"""

from batchdb.dagster._asset import llm_batch_asset
from batchdb.dagster._resource import ROWS_ANSWERED_CHECK, BatchDBResource, rows_answered_check

__all__ = ["ROWS_ANSWERED_CHECK", "BatchDBResource", "llm_batch_asset", "rows_answered_check"]
