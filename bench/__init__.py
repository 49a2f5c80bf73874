"""batchdb's benchmarks: `python -m bench.ingest` and `python -m bench.queue` (see bench/README.md)."""
