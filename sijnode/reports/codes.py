"""Every coded concept that sijnode writes into a DICOM object, in one place.

Only codes verified in pydicom's PS3.16 dictionaries (``pydicom.sr.codedict``) and listed
in ``DICOM-OUTPUTS.md`` are used; each is looked up by name in that dictionary rather than
typed in, so a code that is not in PS3.16 fails at import. No pre-coordinated SNOMED code
for "sacroiliitis" or "bone marrow oedema" could be verified, so findings are
post-coordinated (PS3.16 TID 1501: Finding + Finding Site):

- CT, Fu et al. 2024: sacroiliitis = Inflammation at the Sacroiliac joint;
- MR, Lee et al. 2021: active sacroiliitis = Edema of Bone marrow at the Sacroiliac joint.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from sijnode.errors import ReportError
from sijnode.models.result import Decision, Finding

#: TID 1501 concept name of the finding type; highdicom writes it for ``finding_type``.
FINDING = codes.DCM.Finding
#: TID 1501 / TID 300 concept name of the finding site; highdicom writes it.
FINDING_SITE = codes.SCT.FindingSite

SACROILIAC_JOINT = codes.SCT.SacroiliacJoint
SACRUM = codes.SCT.Sacrum
ILIUM = codes.SCT.Ilium
BONE_MARROW = codes.SCT.BoneMarrow

INFLAMMATION = codes.SCT.Inflammation
EDEMA = codes.SCT.Edema

#: CID 244 Laterality, keyed by the DICOM laterality letters used in results.
LATERALITY: dict[str, Code] = {
    "R": codes.SCT.Right,
    "L": codes.SCT.Left,
    "B": codes.SCT.Bilateral,
}

#: Qualitative evaluation values (CID 210 Presence / CID 6335 for Indeterminate).
DECISION: dict[Decision, Code] = {
    Decision.PRESENT: codes.SCT.Present,
    Decision.ABSENT: codes.SCT.Absent,
    Decision.INDETERMINATE: codes.SCT.Indeterminate,
}

#: NUM concept name and its UCUM unit "1" (a dimensionless ratio).
PROBABILITY = codes.DCM.Probability
NO_UNITS = codes.UCUM.NoUnits

#: TID 1500 Procedure Reported, keyed by the source Modality.
PROCEDURE_REPORTED: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
}

#: TID 4019 Algorithm Family.
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence

#: TID 2010 Key Object Selection document title (CID 7010 "Of Interest", 113000 DCM).
KEY_OBJECT_TITLE = codes.DCM.OfInterest

#: TID 1002 Observer Type of the node itself (CID 270 "Device", 121007 DCM).
OBSERVER_DEVICE = codes.DCM.Device


@dataclass(frozen=True)
class PostCoordinatedFinding:
    """A finding as Finding (the morphology) + Finding Sites (where it is), PS3.16 TID 1501."""

    #: The morphologic abnormality: TID 1501 Finding and the qualitative evaluation's name.
    finding_type: Code
    #: Anatomic sites in order; the first (the SI joint) carries the laterality.
    sites: tuple[Code, ...]
    #: Plain-language name for SeriesDescription, banners and the KOS summary.
    label: str


_FINDINGS: dict[Finding, PostCoordinatedFinding] = {
    Finding.SACROILIITIS: PostCoordinatedFinding(
        finding_type=INFLAMMATION, sites=(SACROILIAC_JOINT,), label="sacroiliitis"
    ),
    Finding.ACTIVE_SACROILIITIS_BME: PostCoordinatedFinding(
        finding_type=EDEMA,
        sites=(SACROILIAC_JOINT, BONE_MARROW),
        label="active sacroiliitis (bone marrow oedema)",
    ),
}


def finding_codes(finding: Finding) -> PostCoordinatedFinding:
    """The post-coordinated codes of ``finding``."""
    try:
        return _FINDINGS[finding]
    except KeyError as exc:
        raise ReportError(
            f"expected a finding with verified codes ({', '.join(f.value for f in _FINDINGS)}), "
            f"got {finding!r}"
        ) from exc


def laterality_code(laterality: str | None) -> Code | None:
    """The SNOMED laterality of ``"R"``, ``"L"`` or ``"B"``; None when unknown."""
    if laterality is None:
        return None
    try:
        return LATERALITY[laterality]
    except KeyError as exc:
        raise ReportError(f"expected laterality R, L, B or None, got {laterality!r}") from exc


def procedure_code(modality: str) -> Code:
    """TID 1500 Procedure Reported for the source ``modality``."""
    try:
        return PROCEDURE_REPORTED[modality]
    except KeyError as exc:
        raise ReportError(
            f"expected a source Modality of {' or '.join(PROCEDURE_REPORTED)}, got {modality!r}"
        ) from exc
