"""The worker process: claims request rows, calls providers, records outcomes."""

from batchdb.workers.worker import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
