"""A worker process whose batch driver runs on compressed time, for bench/cost.py.

    python -m bench.batch_worker [--concurrency 64]      # BATCHDB_DSN, OPENAI_BASE_URL, OPENAI_API_KEY set

`batchdb worker` polls an open batch every 30 s and looks for batch work every 5 s: right for a
24 h window, but the simulator compresses that window to seconds (docs/simulator.md), so a
benchmark on the real CLI's settings would time its own polling. This is the same `Worker` with
the batch driver's intervals scaled down to the simulator's clock; everything else is the default.
"""

from __future__ import annotations

import argparse

from batchdb.workers.batch_driver import BatchDriverConfig
from batchdb.workers.outcomes import RetryPolicy
from batchdb.workers.worker import WorkerConfig, run_worker

# Seconds, on the simulator's compressed clock (a batch validates in 0.1 s and runs in 1-2 s).
COMPRESSED = BatchDriverConfig(
    interval=0.2,
    poll_interval=0.25,
    request_timeout=30.0,
    queue_wait=0.5,
    error_wait=0.5,
    retry=RetryPolicy(base_seconds=0.2, max_seconds=1.0),
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    run_worker(WorkerConfig(concurrency=args.concurrency, poll_interval=args.poll_interval, batch=COMPRESSED))


if __name__ == "__main__":
    main()
