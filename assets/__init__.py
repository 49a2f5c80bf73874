"""Dagster definitions: partitioned LLM batch assets that submit one batchdb job per partition (issue 4)."""
