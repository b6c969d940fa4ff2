"""Keyed pseudonyms for patient identifiers (PS3.15 Annex E, keyed-hash replacement).

PatientID and AccessionNumber are stored as HMAC-SHA256 with the site secret
(``database.pseudonym_secret``). Without the secret they cannot be reversed or
recomputed; with it, a researcher can find a study by accession for truth import.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonymise(value: str | None, secret: str, kind: str) -> str | None:
    """Return the hex HMAC-SHA256 of ``kind:value``; None for an empty value."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    return hmac.new(secret.encode(), f"{kind}:{text}".encode(), hashlib.sha256).hexdigest()


def patient_pseudonym(patient_id: str | None, secret: str) -> str | None:
    """Pseudonym of a PatientID."""
    return pseudonymise(patient_id, secret, "patient")


def accession_pseudonym(accession: str | None, secret: str) -> str | None:
    """Pseudonym of an AccessionNumber."""
    return pseudonymise(accession, secret, "accession")
