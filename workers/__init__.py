"""The worker process: claims request rows, calls providers, records outcomes."""

from workers.worker import Worker, WorkerConfig

__all__ = ["Worker", "WorkerConfig"]
