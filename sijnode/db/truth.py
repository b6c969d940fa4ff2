"""Store reference labels (ground truth): the write path of the truth import.

Reading and checking a truth file is :mod:`sijnode.audit.truth`; this module writes the
checked labels, replaces old ones when asked, and records one ``truth_imported`` event,
all in the caller's transaction (append-only except for an asked replacement).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, tuple_
from sqlalchemy.orm import Session

from sijnode.db.engine import record_event
from sijnode.db.schema import EventType, GroundTruth, utcnow

#: (StudyInstanceUID, reader_id): one label per study and reader.
LabelKey = tuple[str, str]


@dataclass(frozen=True)
class TruthLabel:
    """One reference label of a study by a reader (``""``: no reader given)."""

    study_instance_uid: str
    label: bool
    reader_id: str
    slice_labels: list[int] | None


def _chunks(items: Sequence[Any], size: int = 2000) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def existing_labels(session: Session, keys: Sequence[LabelKey]) -> set[LabelKey]:
    """Which of ``keys`` already have a label in the audit."""
    found: set[LabelKey] = set()
    for chunk in _chunks(list(keys)):
        found.update(
            (uid, reader)
            for uid, reader in session.execute(
                select(GroundTruth.study_instance_uid, GroundTruth.reader_id).where(
                    tuple_(GroundTruth.study_instance_uid, GroundTruth.reader_id).in_(chunk)
                )
            )
        )
    return found


def store_labels(
    session: Session,
    labels: Sequence[TruthLabel],
    *,
    source_file: str,
    replace: Collection[LabelKey] = (),
) -> None:
    """Insert ``labels`` from ``source_file`` (a file name, no directory), first deleting
    the labels of the ``replace`` keys, and record one TRUTH_IMPORTED event."""
    for chunk in _chunks(sorted(replace)):
        session.execute(
            delete(GroundTruth).where(
                tuple_(GroundTruth.study_instance_uid, GroundTruth.reader_id).in_(chunk)
            )
        )
    now = utcnow()
    session.add_all(
        GroundTruth(
            study_instance_uid=item.study_instance_uid,
            label=item.label,
            reader_id=item.reader_id,
            source_file=source_file,
            imported_at=now,
            slice_labels=item.slice_labels,
        )
        for item in labels
    )
    record_event(
        session,
        EventType.TRUTH_IMPORTED,
        file=source_file,
        rows=len(labels),
        positives=sum(item.label for item in labels),
        replaced=len(replace),
        readers=sorted({item.reader_id for item in labels}),
    )
    session.flush()
