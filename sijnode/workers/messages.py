"""The queue message: small and typed; ids and paths, never pixels (STYLE.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

#: Name of the Celery task that runs a job.
RUN_JOB_TASK = "sijnode.run_job"


class JobMessage(BaseModel):
    """What a worker needs to find a job: its audit id, pipeline and spool paths."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: int
    pipeline: str
    spool_paths: list[str]
