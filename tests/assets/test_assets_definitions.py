"""The Dagster definitions load, and the pieces that need no database: keys, paths, instance config."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from batchdb import dagster as assets
from batchdb.dagster import BatchDBResource, llm_batch_asset
from batchdb.dagster.dev import storage_url, write_instance_yaml
from batchdb.dagster.example import daily, headline_sentiment, headlines, sample_headlines


def test_public_api_is_pinned() -> None:
    assert assets.__all__ == ["ROWS_ANSWERED_CHECK", "BatchDBResource", "llm_batch_asset", "rows_answered_check"]


def test_example_definitions_load_and_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHDB_DSN", "postgresql://postgres@127.0.0.1:5432/unused")
    from batchdb.dagster.example import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    key = dg.AssetKey("headline_sentiment")
    assert graph.get(key).parent_keys == {dg.AssetKey("headlines")}
    assert headline_sentiment.op.pool == "batchdb"
    assert dg.AssetCheckKey(key, assets.ROWS_ANSWERED_CHECK) in graph.asset_check_keys
    assert len(daily.get_partition_keys()) == 366


def test_sample_dataset_is_deterministic_and_daily() -> None:
    day = sample_headlines("2024-02-29")
    assert len(day) == 15
    assert set(day["day"]) == {"2024-02-29"}
    assert day["headline_id"].is_unique
    assert day.equals(sample_headlines("2024-02-29"))
    assert not set(day["headline_id"]) & set(sample_headlines("2024-03-01")["headline_id"])


def _run(
    asset_fn: Any,
    partitions_def: dg.PartitionsDefinition | None = None,
    partition_key: str | None = None,
    resource: BatchDBResource | None = None,
) -> Any:
    """Materialize one asset that records what the resource computes, with no database involved."""
    seen: dict[str, Any] = {}

    @dg.asset(name="probe", key_prefix=["news"], partitions_def=partitions_def)
    def probe(context: dg.AssetExecutionContext, batchdb: BatchDBResource) -> None:
        seen["value"] = asset_fn(context, batchdb)

    result = dg.materialize(
        [probe],
        partition_key=partition_key,
        resources={"batchdb": resource or BatchDBResource(dsn="unused", output_root="/out")},
    )
    assert result.success
    return seen["value"]


def test_idempotency_key_names_asset_and_partition_and_follows_what_changes_the_answers() -> None:
    frame = sample_headlines("2024-01-05")

    def keys(context: dg.AssetExecutionContext, batchdb: BatchDBResource) -> dict[str, str]:
        base = {"model": "gpt-4o-mini", "prompt": "Sentiment: {headline}", "max_tokens": 20}
        return {
            "base": batchdb.idempotency_key(context, frame, **base),
            "again": batchdb.idempotency_key(context, frame.copy(), **base),
            "budget": batchdb.idempotency_key(context, frame, **base, budget_usd=5.0, priority=3, max_attempts=2),
            "deadline": batchdb.idempotency_key(context, frame, **base, deadline=datetime.now(UTC)),
            "prompt": batchdb.idempotency_key(context, frame, **{**base, "prompt": "Mood: {headline}"}),
            "model": batchdb.idempotency_key(context, frame, **{**base, "model": "gpt-4o"}),
            "params": batchdb.idempotency_key(context, frame, **{**base, "max_tokens": 21}),
            "data": batchdb.idempotency_key(context, frame.iloc[:-1], **base),
        }

    found = _run(keys, daily, "2024-01-05")
    assert found["base"].startswith("dagster:news/probe:2024-01-05:")
    assert found["base"] == found["again"] == found["budget"] == found["deadline"]
    others = [found[k] for k in ("prompt", "model", "params", "data")]
    assert len({found["base"], *others}) == 5


def test_output_path_layouts() -> None:
    def path(context: dg.AssetExecutionContext, batchdb: BatchDBResource) -> Path:
        return batchdb.output_path(context)

    files = BatchDBResource(dsn="unused", output_root="/out")
    hive = BatchDBResource(dsn="unused", output_root="/out", layout="hive")
    assert _run(path, daily, "2024-01-05", files) == Path("/out/news/probe/2024-01-05.parquet")
    assert _run(path, daily, "2024-01-05", hive) == Path("/out/news/probe/date=2024-01-05/part-0.parquet")
    regions = dg.StaticPartitionsDefinition(["eu/west", "us"])
    assert _run(path, regions, "eu/west", files) == Path("/out/news/probe/eu%2Fwest.parquet")
    assert _run(path, regions, "us", hive) == Path("/out/news/probe/partition=us/part-0.parquet")
    both = dg.MultiPartitionsDefinition({"day": daily, "region": regions})
    key = dg.MultiPartitionKey({"day": "2024-01-05", "region": "us"})
    assert _run(path, both, key, hive) == Path("/out/news/probe/day=2024-01-05/region=us/part-0.parquet")
    assert _run(path, None, None, files) == Path("/out/news/probe.parquet")


def test_llm_batch_asset_declares_input_pool_check_and_a_code_version_that_follows_the_prompt() -> None:
    def build(prompt: str) -> dg.AssetsDefinition:
        return llm_batch_asset(
            name="mood",
            source=headlines,
            prompt=prompt,
            model="gpt-4o-mini",
            id_column="headline_id",
            max_tokens=10,
            pool="llm",
        )

    first, same, changed = build("Mood: {headline}"), build("Mood: {headline}"), build("Tone: {headline}")
    assert first.partitions_def == daily
    assert first.keys_by_input_name["rows"] == headlines.key
    assert first.op.pool == "llm"
    assert [spec.name for spec in first.check_specs] == [assets.ROWS_ANSWERED_CHECK]
    version = first.code_versions_by_key[dg.AssetKey("mood")]
    assert version == same.code_versions_by_key[dg.AssetKey("mood")]
    assert version != changed.code_versions_by_key[dg.AssetKey("mood")]
    assert "batchdb" in headline_sentiment.required_resource_keys


def test_instance_yaml_limits_runs_and_the_pool(tmp_path: Path) -> None:
    write_instance_yaml(tmp_path, storage_dsn=None, max_concurrent_runs=5, pool_limit=3)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        config = instance.get_concurrency_config()
        assert config.run_queue_config is not None
        assert config.run_queue_config.max_concurrent_runs == 5
        assert config.pool_config.default_pool_limit == 3
        assert config.pool_config.pool_granularity.value == "run"


def test_storage_url_names_the_psycopg2_driver() -> None:
    assert (
        storage_url("postgresql://postgres@127.0.0.1:5432/batchdb")
        == "postgresql+psycopg2://postgres@127.0.0.1:5432/batchdb"
    )
    assert (
        storage_url("host=/tmp/pg port=5433 user=me password=p@ss dbname=x")
        == "postgresql+psycopg2://me:p%40ss@/x?host=%2Ftmp%2Fpg&port=5433"
    )


def test_data_fingerprint_covers_arrow_tables_and_files(tmp_path: Path) -> None:
    import pyarrow as pa

    from batchdb.dagster._resource import _data_fingerprint

    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    table = pa.Table.from_pandas(frame, preserve_index=False)
    path = tmp_path / "rows.csv"
    frame.to_csv(path, index=False)
    assert _data_fingerprint(table) == _data_fingerprint(pa.Table.from_pandas(frame.copy(), preserve_index=False))
    assert _data_fingerprint(table) != _data_fingerprint(table.slice(0, 1))
    first = _data_fingerprint(path)
    path.write_text("a,b\n1,x\n")
    assert first != _data_fingerprint(path)


def test_an_auto_mode_asset_takes_a_deadline_that_is_not_part_of_its_code_version() -> None:
    def build(deadline: timedelta) -> dg.AssetsDefinition:
        return llm_batch_asset(
            name="mood",
            source=headlines,
            prompt="Mood: {headline}",
            model="gpt-4o-mini",
            mode="auto",
            deadline=deadline,
        )

    six, twelve = build(timedelta(hours=6)), build(timedelta(hours=12))
    key = dg.AssetKey("mood")
    assert six.code_versions_by_key[key] == twelve.code_versions_by_key[key]
    online = llm_batch_asset(name="mood", source=headlines, prompt="Mood: {headline}", model="gpt-4o-mini")
    assert online.code_versions_by_key[key] != six.code_versions_by_key[key]  # the mode is part of it
