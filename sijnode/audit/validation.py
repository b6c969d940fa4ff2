"""Pair each study's result with its reference label and compute the metrics per group.

The result of a study is the latest prediction at study or subject level of a job that
was not superseded. When several pipelines or model versions match the filters, the
latest one wins, except with ``group_by=model_version``, where each model version
keeps its own latest result. The reference label is one reader's (``reader``) or the
majority of all readers; studies whose readers tie are left out and counted. The
statistics themselves are :mod:`sijnode.evaluation`'s.
"""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.audit.filters import AuditFilter
from sijnode.audit.queries import RESULT_LEVELS, job_conditions, studies_select, truth_consensus
from sijnode.db.schema import Job, JobState, Prediction, Series, Study, as_utc
from sijnode.evaluation.report import MetricsReport, evaluate


class GroupBy(enum.StrEnum):
    """What ``audit metrics --group-by`` splits the studies by."""

    none = "none"
    site = "site"
    scanner = "scanner"
    model_version = "model_version"


@dataclass(frozen=True)
class ValidationCase:
    """One study's result and reference label."""

    study_instance_uid: str
    group: str
    probability: float
    label: bool
    truth: bool
    model_version: str | None
    job_id: int


def _scanner(series: list[Series], wanted: list[str]) -> str:
    chosen = [s for s in series if s.series_instance_uid in set(wanted)] or series
    names = sorted(
        {
            " ".join(x for x in (s.manufacturer, s.manufacturer_model_name) if x) or "unknown"
            for s in chosen
        }
    )
    return " + ".join(names) if names else "unknown"


def validation_cases(
    session: Session,
    flt: AuditFilter | None = None,
    *,
    group_by: GroupBy = GroupBy.none,
    reader: str | None = None,
) -> tuple[list[ValidationCase], dict[str, int]]:
    """The (result, truth) pairs for the matching studies, and counts of studies left out:
    results without truth (``no_truth``), tied readers (``readers_tied``), and labelled
    studies without a matching result (``truth_without_result``).

    ``flt`` selects studies by receive time, site and sender, and results by pipeline,
    model version, route and shadow mode (``state`` and ``delivery`` are not used).
    """
    flt = flt or AuditFilter()
    group_by = GroupBy(group_by)
    study_ids = studies_select(
        AuditFilter(since=flt.since, until=flt.until, sender=flt.sender, site=flt.site)
    ).with_only_columns(Study.id)
    stmt = (
        select(Prediction, Job, Study)
        .join(Job, Prediction.job_id == Job.id)
        .join(Study, Job.study_id == Study.id)
        .where(
            Study.id.in_(study_ids),
            Prediction.level.in_(RESULT_LEVELS),
            Job.superseded_by_id.is_(None),
            Job.state != JobState.SUPERSEDED,
            *job_conditions(
                AuditFilter(
                    pipeline=flt.pipeline,
                    model_version=flt.model_version,
                    route=flt.route,
                    shadow=flt.shadow,
                )
            ),
        )
        .order_by(Prediction.created_at, Prediction.id)
    )
    latest: dict[tuple[str, str | None], tuple[Prediction, Job, Study]] = {}
    for pred, job, study in session.execute(stmt):
        key_version = job.model_version if group_by is GroupBy.model_version else None
        latest[(study.study_instance_uid, key_version)] = (pred, job, study)

    series_by_study: dict[int, list[Series]] = defaultdict(list)
    if group_by is GroupBy.scanner and latest:
        ids = sorted({study.id for _, _, study in latest.values()})
        for start in range(0, len(ids), 5000):
            for s in session.scalars(
                select(Series).where(Series.study_id.in_(ids[start : start + 5000]))
            ):
                series_by_study[s.study_id].append(s)

    study_uids = set(
        session.scalars(select(Study.study_instance_uid).where(Study.id.in_(study_ids)))
    )
    truth, tied = truth_consensus(session, study_uids, reader=reader)
    cases: list[ValidationCase] = []
    excluded: Counter[str] = Counter()
    for (uid, _), (pred, job, study) in sorted(
        latest.items(), key=lambda kv: (as_utc(kv[1][2].first_received_at), kv[0][0])
    ):
        if uid in tied:
            excluded["readers_tied"] += 1
            continue
        if uid not in truth:
            excluded["no_truth"] += 1
            continue
        if group_by is GroupBy.site:
            group = study.site
        elif group_by is GroupBy.scanner:
            group = _scanner(series_by_study.get(study.id, []), list(job.series_uids or []))
        elif group_by is GroupBy.model_version:
            group = job.model_version or "unknown"
        else:
            group = "all"
        cases.append(
            ValidationCase(
                study_instance_uid=uid,
                group=group,
                probability=pred.probability,
                label=pred.label,
                truth=truth[uid],
                model_version=job.model_version,
                job_id=job.id,
            )
        )
    with_result = {uid for uid, _ in latest}
    missing = (set(truth) | tied) - with_result
    if missing:
        excluded["truth_without_result"] = len(missing)
    return cases, dict(excluded)


@dataclass
class ValidationResult:
    """The reports per group and how many studies were left out, and why."""

    reports: list[MetricsReport]
    excluded: dict[str, int]
    group_by: GroupBy
    cases: list[ValidationCase]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "group_by": self.group_by.value,
            "excluded": dict(self.excluded),
            "groups": [r.as_dict() for r in self.reports],
        }


def compute_metrics(
    session: Session,
    flt: AuditFilter | None = None,
    *,
    group_by: GroupBy = GroupBy.none,
    reader: str | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    n_bins: int = 10,
) -> ValidationResult:
    """One :class:`MetricsReport` per group (sorted by name), from the audit."""
    group_by = GroupBy(group_by)
    cases, excluded = validation_cases(session, flt, group_by=group_by, reader=reader)
    by_group: dict[str, list[ValidationCase]] = defaultdict(list)
    for case in cases:
        by_group[case.group].append(case)
    reports = [
        evaluate(
            [c.truth for c in by_group[group]],
            [c.label for c in by_group[group]],
            [c.probability for c in by_group[group]],
            group=group,
            n_resamples=n_resamples,
            seed=seed,
            confidence=confidence,
            n_bins=n_bins,
        )
        for group in sorted(by_group)
    ]
    return ValidationResult(reports=reports, excluded=excluded, group_by=group_by, cases=cases)


def write_roc_png(result: ValidationResult, path: Path) -> Path:
    """The ROC curve of each group, with its AUC and bootstrap interval in the legend."""
    from sijnode.evaluation.plots import RocSeries
    from sijnode.evaluation.plots import write_roc_png as write

    series = []
    for report in result.reports:
        items = [c for c in result.cases if c.group == report.group]
        auc = report.metric("roc_auc")
        series.append(
            RocSeries(
                name=report.group,
                y_true=[c.truth for c in items],
                scores=[c.probability for c in items],
                auc_interval=(auc.ci_low, auc.ci_high),
            )
        )
    return write(series, path)


def write_calibration_png(result: ValidationResult, path: Path) -> Path:
    """The reliability diagram of each group."""
    from sijnode.evaluation.plots import write_calibration_png as write

    return write(result.reports, path)
