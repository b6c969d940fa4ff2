"""Studies, series and instances in the audit: the rows the listener writes and jobs read.

A series belongs to exactly one study: series are keyed by (StudyInstanceUID,
SeriesInstanceUID), so a second study that reuses a series UID gets a series of its own
(docs/receiving.md, "Series UIDs seen under two studies").
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.schema import Instance, Job, Series, Study
from sijnode.errors import MixedInputsError

_CHUNK = 500  # spool paths per IN (...) list


def check_job_inputs(session: Session, job: Job) -> None:
    """Raise MixedInputsError unless every input of ``job`` is an instance of its study.

    Each spool path the job will read must have an instance row whose study, and whose
    series' study, is the job's own, and those studies must carry one patient pseudonym.
    Run when dispatch creates the job and again by the worker before the pipeline starts.
    """
    paths = list(dict.fromkeys(job.spool_paths or []))
    rows: list[tuple[str, int, int, str | None]] = []
    for start in range(0, len(paths), _CHUNK):
        chunk = paths[start : start + _CHUNK]
        rows += [
            (path, instance_study, series_study, pseudonym)
            for path, instance_study, series_study, pseudonym in session.execute(
                select(
                    Instance.spool_path,
                    Instance.study_id,
                    Series.study_id,
                    Study.patient_pseudonym,
                )
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.spool_path.in_(chunk))
            )
        ]
    found = {path for path, *_ in rows}
    unknown = [path for path in paths if path not in found]
    if unknown:
        raise MixedInputsError(
            f"job {job.id}: expected an instance row for each of its {len(paths)} inputs, "
            f"got {len(unknown)} without one"
        )
    studies = {study for _, study, _, _ in rows} | {study for _, _, study, _ in rows}
    if studies - {job.study_id}:
        others = sorted(studies - {job.study_id})
        raise MixedInputsError(
            f"job {job.id}: expected every input from study {job.study_id}, "
            f"got instances or series of studies {others}"
        )
    pseudonyms = {pseudonym for *_, pseudonym in rows}
    if len(pseudonyms) > 1:
        raise MixedInputsError(
            f"job {job.id}: expected the inputs of one patient, "
            f"got {len(pseudonyms)} patient pseudonyms"
        )
