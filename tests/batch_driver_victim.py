"""A process that drives batch chunks (workers/batch_driver.py) and SIGKILLs itself at one step.

    python tests/batch_driver_victim.py DSN OPENAI_BASE_URL API_KEY STEP

Used by tests/test_batch_driver.py: the real driver, in a process of its own, dies at `STEP` the
way a worker killed by the OOM killer or `kill -9` does (no cleanup, no lease let go, its database
connection cut mid-session), so the test can check what a successor makes of what is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from batchdb.providers.openai import OpenAIProvider
from batchdb.workers.batch_driver import BatchDriver, BatchDriverConfig, Chunk
from batchdb.workers.connection import Reconnecting
from batchdb.workers.outcomes import RetryPolicy


async def main(dsn: str, base_url: str, api_key: str, step: str) -> None:
    def die_at(name: str, chunk: Chunk) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    config = BatchDriverConfig(
        interval=0.05,
        poll_interval=0.05,
        lease_seconds=1.5,
        request_timeout=0.5,
        queue_wait=0.05,
        error_wait=0.05,
        retry=RetryPolicy(0.05, 0.1),
        delete_files=False,  # its successor's test counts every file ever uploaded
    )
    api = OpenAIProvider(api_key=api_key, base_url=base_url, timeout=5.0).batch_api(timeout=config.request_timeout)
    driver = BatchDriver(
        Reconnecting(dsn, name="victim"), config, worker_id="victim", api_for=lambda _p, _a: api, checkpoint=die_at
    )
    for _ in range(600):  # never more than a minute: the step comes within a few passes
        await driver.run_once()
        await asyncio.sleep(0.05)
    sys.exit(f"never reached step {step!r}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
