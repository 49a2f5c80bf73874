"""`llm_batch_asset`: declare an LLM batch over a partitioned upstream asset in one call."""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import dagster as dg

from batchdb.dagster._resource import BatchDBResource, _canonical, rows_answered_check

SourceAsset = dg.AssetsDefinition | dg.AssetSpec | dg.AssetKey | str | Sequence[str]


def llm_batch_asset(
    *,
    name: str,
    source: SourceAsset,
    model: str,
    prompt: str | None = None,
    system: str | None = None,
    provider: str = "openai",
    id_column: str | None = None,
    response_schema: Any = None,
    partitions_def: dg.PartitionsDefinition | None = None,
    failures_fatal: bool = False,
    pool: str | None = "batchdb",
    resource_key: str = "batchdb",
    key_prefix: str | Sequence[str] | None = None,
    group_name: str | None = None,
    description: str | None = None,
    preview_rows: int = 10,
    **submit_options: Any,
) -> dg.AssetsDefinition:
    """An asset that sends each partition of `source` through an LLM as one batchdb job.

    The upstream asset's value for the partition (a DataFrame, an Arrow table or a file path) is
    submitted with `prompt` (a template over its columns, "Sentiment of: {headline}"), `model`,
    `provider` and any other `batchdb.submit` option (`max_tokens=`, `temperature=`, `budget_usd=`,
    `response_format=`, `mode="batch"` for the provider's Batch API at about half the price,
    `mode="auto", deadline=timedelta(hours=6)` for batch where a batch can end before the deadline and
    online for the rest, `reuse="exact"` to answer rows that earlier jobs already answered with the
    same prompt, model and parameters (rows repeated across partitions, a rebuilt partition) from their
    stored answers at $0 ...). A deadline given as a timedelta counts from each run's submit.
    The asset waits for the job, writes `<output_root>/<name>/<partition>.parquet` (the source's
    columns plus response, status, tokens, cost and error) and records row counts, tokens, cost, the
    job id and a preview. Its `all_rows_answered` check warns about rows without an answer;
    `failures_fatal=True` fails the asset on them instead.

    A backfill runs one partition per run (Dagster's default for assets without a backfill policy), and
    the asset belongs to the concurrency pool `pool`, so the instance's pool limit bounds how many jobs a
    backfill keeps in the queue at once.
    The asset's code version is a digest of prompt, model and parameters: changing them marks materialized
    partitions as changed in the UI, and re-materializing them starts new jobs.

    Examples:
        .. code-block:: python

            import dagster as dg
            import pandas as pd

            from batchdb.dagster import BatchDBResource, llm_batch_asset

            daily = dg.DailyPartitionsDefinition(start_date="2020-01-01")


            @dg.asset(partitions_def=daily)
            def headlines(context: dg.AssetExecutionContext) -> pd.DataFrame:
                return pd.read_parquet(f"/data/news/{context.partition_key}.parquet")


            headline_sentiment = llm_batch_asset(
                name="headline_sentiment",
                source=headlines,
                prompt="Classify the sentiment of this headline: {headline}",
                id_column="headline_id",
                model="gpt-4o-mini",
                response_schema={"type": "object", "properties": {"sentiment": {"type": "string"}}},
            )

            defs = dg.Definitions(
                assets=[headlines, headline_sentiment],
                resources={"batchdb": BatchDBResource(dsn=dg.EnvVar("BATCHDB_DSN"), output_root="/data/llm")},
            )
    """
    source_key, source_partitions = _source(source)
    partitions_def = partitions_def or source_partitions
    prefix = [key_prefix] if isinstance(key_prefix, str) else list(key_prefix or [])
    asset_key = dg.AssetKey([*prefix, name])
    options: dict[str, Any] = {
        "system": system,
        "provider": provider,
        "id_column": id_column,
        "response_schema": response_schema,
        **submit_options,
    }
    options = {k: v for k, v in options.items() if v is not None}
    # The deadline says when, not what: it is not part of the code version.
    definition = {
        "model": model,
        "prompt": prompt,
        **{k: _canonical(v) for k, v in options.items() if k != "deadline"},
    }

    @dg.asset(
        key=asset_key,
        ins={"rows": dg.AssetIn(key=source_key)},
        partitions_def=partitions_def,
        pool=pool,
        required_resource_keys={resource_key},
        check_specs=[rows_answered_check(asset_key)],
        code_version=hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:16],
        kinds={"batchdb", "parquet"},
        group_name=group_name,
        description=description or f"{model} over each partition of {source_key.to_user_string()} (batchdb)",
        metadata={
            "model": model,
            "provider": provider,
            "prompt": prompt or "",
            "batchdb/definition": dg.MetadataValue.json(json.loads(json.dumps(definition, default=str))),
        },
    )
    # Dagster reads this annotation to define the outputs and recognises only the bare class
    # (op_definition._is_result_object_type compares with `in (MaterializeResult, ...)`).
    def _llm_batch(context: dg.AssetExecutionContext, rows: Any) -> dg.MaterializeResult:  # type: ignore[type-arg]
        resource: BatchDBResource = getattr(context.resources, resource_key)
        return resource.run(
            context,
            rows,
            model=model,
            prompt=prompt,
            failures_fatal=failures_fatal,
            preview_rows=preview_rows,
            **options,
        )

    return _llm_batch


def _source(source: SourceAsset) -> tuple[dg.AssetKey, dg.PartitionsDefinition | None]:
    if isinstance(source, dg.AssetsDefinition):
        return source.key, source.partitions_def
    if isinstance(source, dg.AssetSpec):
        return source.key, source.partitions_def
    return dg.AssetKey.from_coercible(source), None
