"""batchdb: run millions of LLM requests through a PostgreSQL queue, inside provider rate limits.

The public names load lazily: a worker process imports `batchdb.queue` and
friends without paying for pandas and pyarrow, which only submitting and
reading results need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchdb.errors import BatchDBError, DatabaseError, DatabaseMissing, DatabaseUnavailable, SchemaNotReady
    from batchdb.estimation import Estimate, estimate
    from batchdb.ingest import DataSource, InputError
    from batchdb.jobs import Job, JobNotFound, JobPaused, JobProgress, get_job, list_jobs
    from batchdb.models import JobStatus, RequestStatus
    from batchdb.submission import submit

__all__ = [
    "BatchDBError",
    "DataSource",
    "DatabaseError",
    "DatabaseMissing",
    "DatabaseUnavailable",
    "Estimate",
    "InputError",
    "Job",
    "JobNotFound",
    "JobPaused",
    "JobProgress",
    "JobStatus",
    "RequestStatus",
    "SchemaNotReady",
    "estimate",
    "get_job",
    "list_jobs",
    "submit",
]
__version__ = "0.1.0"

_HOME = {
    "BatchDBError": "batchdb.errors",
    "DatabaseError": "batchdb.errors",
    "DatabaseMissing": "batchdb.errors",
    "DatabaseUnavailable": "batchdb.errors",
    "SchemaNotReady": "batchdb.errors",
    "Estimate": "batchdb.estimation",
    "estimate": "batchdb.estimation",
    "DataSource": "batchdb.ingest",  # what submit() reads: DataFrame, Arrow table or a file path
    "InputError": "batchdb.ingest",
    "Job": "batchdb.jobs",
    "JobNotFound": "batchdb.jobs",
    "JobPaused": "batchdb.jobs",
    "JobProgress": "batchdb.jobs",
    "get_job": "batchdb.jobs",
    "list_jobs": "batchdb.jobs",
    "JobStatus": "batchdb.models",
    "RequestStatus": "batchdb.models",
    "submit": "batchdb.submission",
}


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'batchdb' has no attribute {name!r}")
