"""batchdb: run millions of LLM requests through a PostgreSQL queue, inside provider rate limits."""

from batchdb.ingest import InputError
from batchdb.jobs import Job, JobNotFound, JobProgress, get_job, list_jobs
from batchdb.models import JobStatus, RequestStatus
from batchdb.submit import submit

__all__ = [
    "InputError",
    "Job",
    "JobNotFound",
    "JobProgress",
    "JobStatus",
    "RequestStatus",
    "get_job",
    "list_jobs",
    "submit",
]
__version__ = "0.1.0"
