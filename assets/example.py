"""The example code location: the market sentiment of daily financial headlines, one batchdb job per day.

The sample dataset is synthetic and deterministic (`batchdb.demo.demo_headlines`: 15 headlines a
day, 2024-01-01 to 2024-12-31), generated in memory when first read, so the example runs offline
against the provider simulator. `workspace.yaml` at the repository root loads this module;
`batchdb dagster` (`batchdb.dagster.dev.run_dev`) starts it with workers and the simulator.

Environment: BATCHDB_DSN (the batchdb database), BATCHDB_OUTPUT_ROOT (where the Parquet files go,
default ./batchdb-output).
"""

import os
from functools import cache

import dagster as dg
import pandas as pd

from batchdb.dagster import BatchDBResource, llm_batch_asset
from batchdb.demo import SENTIMENT_SCHEMA, demo_headlines

FIRST_DAY = "2024-01-01"
END_DAY = "2025-01-01"  # exclusive: every day of 2024
HEADLINES_PER_DAY = 15

daily = dg.DailyPartitionsDefinition(start_date=FIRST_DAY, end_date=END_DAY)


@cache
def _sample_dataset() -> pd.DataFrame:
    days = len(daily.get_partition_keys())
    return demo_headlines(days * HEADLINES_PER_DAY)


def sample_headlines(day: str) -> pd.DataFrame:
    """The sample dataset's headlines for one day (an ISO date), in id order."""
    dataset = _sample_dataset()
    return dataset[dataset["day"] == day].reset_index(drop=True)


@dg.asset(partitions_def=daily, group_name="news", kinds={"pandas"})
def headlines(context: dg.AssetExecutionContext) -> dg.Output[pd.DataFrame]:
    """The day's financial headlines from the sample dataset."""
    frame = sample_headlines(context.partition_key)
    return dg.Output(frame, metadata={"dagster/partition_row_count": len(frame)})


headline_sentiment = llm_batch_asset(
    name="headline_sentiment",
    source=headlines,
    prompt="Classify the market sentiment of this headline: {headline}",
    system="You are a financial analyst. Answer in JSON.",
    id_column="headline_id",
    model="gpt-4o-mini",
    provider="openai",
    response_format=SENTIMENT_SCHEMA,
    max_tokens=20,
    temperature=0,
    group_name="news",
)

defs = dg.Definitions(
    assets=[headlines, headline_sentiment],
    # One process per run: the LLM asset only waits on the queue, and a backfill launches many runs.
    executor=dg.in_process_executor,
    resources={
        "batchdb": BatchDBResource(
            dsn=dg.EnvVar("BATCHDB_DSN"),
            output_root=os.environ.get("BATCHDB_OUTPUT_ROOT", "batchdb-output"),
        )
    },
)
