"""The optional pseudonym-to-identifier map (``database.allow_reidentification``).

Off by default: then nothing but the HMAC pseudonyms is ever stored, and a study can be
found by its raw accession number only by someone who holds the site secret. A site
that needs to go back from a pseudonym to the patient turns the setting on, and the
listener calls :func:`remember_identifiers` for every new study.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from sijnode.db.pseudonyms import accession_pseudonym, patient_pseudonym
from sijnode.db.schema import Reidentification
from sijnode.settings import DatabaseSettings, Settings


def remember_identifiers(
    session: Session,
    settings: Settings | DatabaseSettings,
    patient_id: str | None,
    accession: str | None,
) -> int:
    """Store pseudonym → identifier rows if re-identification is allowed; return how many.

    Writes nothing (and returns 0) when ``allow_reidentification`` is off. Pairs that
    are already stored are not written again.
    """
    db = settings.database if isinstance(settings, Settings) else settings
    if not db.allow_reidentification:
        return 0
    pairs = [
        ("patient", patient_pseudonym(patient_id, db.pseudonym_secret), patient_id),
        ("accession", accession_pseudonym(accession, db.pseudonym_secret), accession),
    ]
    written = 0
    for kind, pseudonym, identifier in pairs:
        if pseudonym is None or identifier is None:
            continue
        known = session.scalar(
            select(Reidentification.pseudonym).where(Reidentification.pseudonym == pseudonym)
        )
        if known is None and not any(
            isinstance(o, Reidentification) and o.pseudonym == pseudonym for o in session.new
        ):
            session.add(
                Reidentification(pseudonym=pseudonym, kind=kind, identifier=identifier.strip())
            )
            written += 1
    return written


def reidentify(session: Session, pseudonym: str) -> tuple[str, str] | None:
    """The (kind, identifier) behind ``pseudonym``, or None if it was never stored."""
    row = session.get(Reidentification, pseudonym)
    return None if row is None else (row.kind, row.identifier)
