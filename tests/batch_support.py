"""What the batch-mode tests share: a simulator whose batches finish in well under a second, and a
batch driver that polls them as fast (tests/test_batch_mode.py, tests/test_auto_mode.py)."""

from __future__ import annotations

from typing import Any

from batchdb.simulator import Distribution
from batchdb.workers.batch_driver import BatchDriverConfig
from batchdb.workers.outcomes import RetryPolicy

# Simulator config: a batch validates, runs and finalizes in well under a second.
FAST: dict[str, Any] = {
    "batch_validation_s": 0.05,
    "batch_duration_s": Distribution(kind="fixed", value=0.3),
    "batch_finalizing_s": 0.05,
    "batch_cancelling_s": 0.05,
    "output_tokens": Distribution(kind="fixed", value=12),
}
QUICK_BATCHES = BatchDriverConfig(
    interval=0.05,
    poll_interval=0.05,
    lease_seconds=10.0,
    request_timeout=3.0,
    queue_wait=0.1,
    error_wait=0.1,
    retry=RetryPolicy(base_seconds=0.05, max_seconds=0.1),
)
