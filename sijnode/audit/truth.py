"""Import reference labels (ground truth) from a CSV file, all rows or none.

This module reads and checks the file against the audit (studies by UID or accession
pseudonym, duplicates); :mod:`sijnode.db.truth` writes the checked labels.

Columns (header names, any order, extra columns ignored):

``study_instance_uid`` or ``accession``
    The study, by UID or by its raw AccessionNumber; the accession is pseudonymised
    with the site secret and matched against ``studies.accession_pseudonym``, so the
    raw number is never stored.
``label``
    ``1``/``0``, ``true``/``false``, ``positive``/``negative`` (also ``yes``/``no``,
    ``pos``/``neg``), any case.
``slice_labels`` (optional)
    One ``0``/``1`` per slice in slice order, e.g. ``0011100`` (commas or spaces allowed).
``reader_id`` (optional)
    Who read the study; one label per study and reader.

Every bad row is reported with its line number; if any row is bad nothing is imported.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.pseudonyms import accession_pseudonym
from sijnode.db.schema import Study
from sijnode.db.truth import TruthLabel, existing_labels, store_labels
from sijnode.errors import TruthImportError

UID_COLUMN = "study_instance_uid"
ACCESSION_COLUMN = "accession"
LABEL_COLUMN = "label"
SLICES_COLUMN = "slice_labels"
READER_COLUMN = "reader_id"

_TRUE = {"1", "true", "positive", "pos", "yes", "y", "t"}
_FALSE = {"0", "false", "negative", "neg", "no", "n", "f"}
_SLICE_SEPARATORS = re.compile(r"[\s,;]+")
_OVERFLOW = "\0overflow"  # not a possible header name (headers are stripped text)


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one line of the file (line 1 is the header)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class TruthFileError(TruthImportError):
    """A truth file with bad rows; ``problems`` names each one. Nothing was imported."""

    def __init__(self, path: str, problems: Sequence[RowProblem]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = "\n".join(f"  {p}" for p in self.problems[:50])
        more = len(self.problems) - 50
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{path}: {len(self.problems)} bad row(s), nothing imported:\n{shown}{tail}"
        )


@dataclass(frozen=True)
class TruthRow:
    """One validated row, ready to insert."""

    line: int
    study_instance_uid: str
    label: bool
    reader_id: str
    slice_labels: list[int] | None


@dataclass
class TruthImportResult:
    """What an import wrote."""

    path: str
    rows: int
    positives: int
    replaced: int
    readers: list[str] = field(default_factory=list)


def parse_label(text: str) -> bool:
    """``1/0``, ``true/false``, ``positive/negative`` (and yes/no) to a bool."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"label: expected 0/1, true/false or positive/negative, got {text.strip()!r}")


def parse_slice_labels(text: str) -> list[int] | None:
    """``"0011100"`` or ``"0,0,1"`` to a list of 0/1; None for an empty cell."""
    compact = _SLICE_SEPARATORS.sub("", text.strip())
    if not compact:
        return None
    bad = sorted(set(compact) - {"0", "1"})
    if bad:
        raise ValueError(
            f"slice_labels: expected only 0 and 1 (one per slice), got {''.join(bad)!r} "
            f"in {text.strip()!r}"
        )
    return [int(c) for c in compact]


def _read(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header: list[str] | None = None
            rows: list[tuple[int, dict[str, str]]] = []
            start = 1
            for record in reader:
                if header is None:
                    header = [h.strip().lower() for h in record]
                    start = reader.line_num + 1
                    continue
                line = start
                start = reader.line_num + 1
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) > len(header):
                    extra = record[len(header) :]
                    if any(cell.strip() for cell in extra):
                        rows.append(
                            (line, {_OVERFLOW: f"{len(record)} cells, header has {len(header)}"})
                        )
                        continue
                cells = dict(zip(header, record, strict=False))
                rows.append((line, {k: v for k, v in cells.items() if k}))
    except FileNotFoundError as exc:
        raise TruthImportError(f"truth file {path} does not exist") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TruthImportError(f"truth file {path} is not a UTF-8 CSV file: {exc}") from exc
    return header or [], rows


def validate_truth_file(session: Session, path: Path, secret: str) -> list[TruthRow]:
    """Read and check every row; raise :class:`TruthFileError` listing all bad ones."""
    header, records = _read(path)
    name = str(path)
    problems: list[RowProblem] = []
    missing = []
    if LABEL_COLUMN not in header:
        missing.append(LABEL_COLUMN)
    if UID_COLUMN not in header and ACCESSION_COLUMN not in header:
        missing.append(f"{UID_COLUMN} or {ACCESSION_COLUMN}")
    if missing:
        raise TruthFileError(
            name,
            [
                RowProblem(
                    1,
                    f"missing column(s) {', '.join(missing)}; header has "
                    f"{', '.join(h for h in header if h) or 'nothing'}",
                )
            ],
        )
    if not records:
        raise TruthFileError(name, [RowProblem(1, "no data rows after the header")])

    uids = {r.get(UID_COLUMN, "").strip() for _, r in records} - {""}
    known_uids: set[str] = set()
    for chunk in _chunks(sorted(uids)):
        known_uids.update(
            session.scalars(
                select(Study.study_instance_uid).where(Study.study_instance_uid.in_(chunk))
            )
        )
    pseudonyms = {accession_pseudonym(r.get(ACCESSION_COLUMN, ""), secret) for _, r in records} - {
        None
    }
    by_accession: dict[str, list[str]] = {}
    for chunk in _chunks(sorted(p for p in pseudonyms if p)):
        for pseud, uid in session.execute(
            select(Study.accession_pseudonym, Study.study_instance_uid).where(
                Study.accession_pseudonym.in_(chunk)
            )
        ):
            by_accession.setdefault(str(pseud), []).append(uid)

    good: list[TruthRow] = []
    seen: dict[tuple[str, str], int] = {}
    for line, cells in records:
        if _OVERFLOW in cells:
            problems.append(RowProblem(line, f"too many cells ({cells[_OVERFLOW]})"))
            continue
        row_problems: list[str] = []
        uid = cells.get(UID_COLUMN, "").strip()
        accession = cells.get(ACCESSION_COLUMN, "").strip()
        study_uid: str | None = None
        if uid:
            if uid not in known_uids:
                row_problems.append(f"unknown study: no study with StudyInstanceUID {uid!r}")
            else:
                study_uid = uid
        if accession:
            matches = by_accession.get(accession_pseudonym(accession, secret) or "", [])
            if not matches:
                row_problems.append(
                    "unknown study: no study with this accession number "
                    "(matched by pseudonym with the site secret)"
                )
            elif len(matches) > 1:
                row_problems.append(
                    f"ambiguous accession number: {len(matches)} studies have it; "
                    f"give study_instance_uid instead"
                )
            elif study_uid is not None and matches[0] != study_uid:
                row_problems.append(
                    f"accession number belongs to study {matches[0]}, not to {study_uid}"
                )
            elif not uid:
                study_uid = matches[0]
        if not uid and not accession:
            row_problems.append(f"expected {UID_COLUMN} or {ACCESSION_COLUMN}, got neither")
        label: bool | None = None
        try:
            label = parse_label(cells.get(LABEL_COLUMN, ""))
        except ValueError as exc:
            row_problems.append(str(exc))
        slices: list[int] | None = None
        try:
            slices = parse_slice_labels(cells.get(SLICES_COLUMN, ""))
        except ValueError as exc:
            row_problems.append(str(exc))
        reader = cells.get(READER_COLUMN, "").strip()
        if len(reader) > 64:
            row_problems.append(f"reader_id: expected at most 64 characters, got {len(reader)}")
        if study_uid is not None and not row_problems:
            key = (study_uid, reader)
            if key in seen:
                who = f"reader {reader!r}" if reader else "no reader_id"
                row_problems.append(
                    f"duplicate: study {study_uid} with {who} is already on line {seen[key]}"
                )
            else:
                seen[key] = line
        if row_problems:
            problems.extend(RowProblem(line, p) for p in row_problems)
        elif study_uid is not None and label is not None:
            good.append(TruthRow(line, study_uid, label, reader, slices))
    if problems:
        raise TruthFileError(name, problems)
    return good


def _chunks(items: Sequence[Any], size: int = 5000) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def import_truth(
    session: Session, path: Path, secret: str, *, replace: bool = False
) -> TruthImportResult:
    """Validate ``path`` and insert its labels in the caller's transaction.

    A label that already exists for the same study and reader is an error unless
    ``replace`` is set, in which case the old label is replaced. Records one
    TRUTH_IMPORTED event. Raises :class:`TruthFileError` (nothing written) on bad rows.
    """
    rows = validate_truth_file(session, path, secret)
    existing = existing_labels(session, [(r.study_instance_uid, r.reader_id) for r in rows])
    if existing and not replace:
        raise TruthFileError(
            str(path),
            [
                RowProblem(
                    r.line,
                    f"duplicate: study {r.study_instance_uid} already has a label from "
                    + (f"reader {r.reader_id!r}" if r.reader_id else "no reader_id")
                    + " in the audit (use --replace to replace it)",
                )
                for r in rows
                if (r.study_instance_uid, r.reader_id) in existing
            ],
        )
    store_labels(
        session,
        [TruthLabel(r.study_instance_uid, r.label, r.reader_id, r.slice_labels) for r in rows],
        source_file=path.name,
        replace=existing,
    )
    return TruthImportResult(
        path=str(path),
        rows=len(rows),
        positives=sum(r.label for r in rows),
        replaced=len(existing),
        readers=sorted({r.reader_id for r in rows}),
    )
