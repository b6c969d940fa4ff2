"""The whole bundle of a job: files on disk, the optional KOS, the SR factory, the codes."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
)

from sijnode.errors import ReportError
from sijnode.models.result import Decision, Finding
from sijnode.reports import codes
from sijnode.reports.build import build_outputs, reencode_sr
from sijnode.reports.kos import KO_SERIES_DESCRIPTION, summary_text
from sijnode.reports.uids import JobUIDs, Role, output_uid
from sijnode.settings import Settings
from sijnode.uids import is_valid_uid
from tests.test_reports_inputs import (
    assert_round_trip,
    assert_valid,
    ct_case,
    make_result,
    mr_case,
)

#: The verified codes of DICOM-OUTPUTS.md, typed in from that table.
VERIFIED = {
    "FINDING": ("121071", "DCM"),
    "FINDING_SITE": ("363698007", "SCT"),
    "SACROILIAC_JOINT": ("39723000", "SCT"),
    "SACRUM": ("54735007", "SCT"),
    "ILIUM": ("22356005", "SCT"),
    "BONE_MARROW": ("14016003", "SCT"),
    "INFLAMMATION": ("409774005", "SCT"),
    "EDEMA": ("79654002", "SCT"),
    "PROBABILITY": ("122157", "DCM"),
    "NO_UNITS": ("1", "UCUM"),
    "ALGORITHM_FAMILY": ("123110", "DCM"),
}


def test_codes_are_the_verified_ones() -> None:
    for name, (value, scheme) in VERIFIED.items():
        code = getattr(codes, name)
        assert (code.value, code.scheme_designator) == (value, scheme), name
    assert {k: (c.value, c.scheme_designator) for k, c in codes.LATERALITY.items()} == {
        "R": ("24028007", "SCT"),
        "L": ("7771000", "SCT"),
        "B": ("51440002", "SCT"),
    }
    assert {k: c.value for k, c in codes.DECISION.items()} == {
        Decision.PRESENT: "52101004",
        Decision.ABSENT: "272519000",
        Decision.INDETERMINATE: "82334004",
    }
    assert {k: (c.value, c.scheme_designator) for k, c in codes.PROCEDURE_REPORTED.items()} == {
        "CT": ("25045-6", "LN"),
        "MR": ("25056-3", "LN"),
    }
    ct = codes.finding_codes(Finding.SACROILIITIS)
    assert ct.finding_type == codes.INFLAMMATION and ct.sites == (codes.SACROILIAC_JOINT,)
    mr = codes.finding_codes(Finding.ACTIVE_SACROILIITIS_BME)
    assert mr.finding_type == codes.EDEMA
    assert mr.sites == (codes.SACROILIAC_JOINT, codes.BONE_MARROW)
    with pytest.raises(ReportError, match="laterality R, L, B or None"):
        codes.laterality_code("X")
    with pytest.raises(ReportError, match="source Modality of CT or MR"):
        codes.procedure_code("US")


def test_output_uids_are_deterministic_and_distinct() -> None:
    root = Settings().node.uid_root
    a, b = JobUIDs(root, "job-a"), JobUIDs(root, "job-b")
    every = [
        a.sr_series,
        a.sc_series,
        a.ko_series,
        a.sr(ComprehensiveSRStorage),
        a.sr(EnhancedSRStorage),
        a.ko(),
        *(a.sc(n) for n in range(1, 9)),
        *(a.tracking(n) for n in range(9)),
    ]
    assert len(set(every)) == len(every)
    assert all(is_valid_uid(u) and u.startswith(root) for u in every)
    assert every[0] == JobUIDs(root, "job-a").sr_series == output_uid(root, "job-a", Role.SR_SERIES)
    assert a.sc(1) != b.sc(1)
    other_root = "1.2.3.4."
    assert JobUIDs(other_root, "job-a").sc(1).startswith(other_root)


def test_bundle_writes_every_object_and_they_read_back(tmp_path: Path) -> None:
    case = mr_case(tmp_path / "src")
    settings = Settings(reports={"kos": True})
    bundle = build_outputs(case.result, case.paths, case.job_key, settings)
    paths = bundle.write(tmp_path / "out")
    assert [p.name for p in paths] == ["sr-1.dcm", "sc-1.dcm", "sc-2.dcm", "sc-3.dcm", "ko-1.dcm"]
    assert not list((tmp_path / "out").glob("*.partial"))
    for ds, path in zip(bundle.datasets(), paths, strict=True):
        assert_round_trip(ds, tmp_path / f"again-{path.name}")
        assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    assert assert_valid(paths) == {}
    assert {pydicom.dcmread(p).StudyInstanceUID for p in paths} == {case.result.study_instance_uid}
    # the same content written as another SR class, for a destination that took only that
    enhanced = bundle.write(tmp_path / "enhanced", sr_sop_class_uid=EnhancedSRStorage)
    assert pydicom.dcmread(enhanced[0]).SOPClassUID == EnhancedSRStorage
    assert bundle.sr_as(EnhancedSRStorage) is bundle.sr_as(EnhancedSRStorage)  # built once
    # the preferred class comes first in reports.sr_sop_classes
    preferred = Settings(reports={"sr_sop_classes": [EnhancedSRStorage, ComprehensiveSRStorage]})
    assert build_outputs(case.result, case.paths, case.job_key, preferred).sr.SOPClassUID == (
        EnhancedSRStorage
    )


def test_key_object_selection(tmp_path: Path) -> None:
    case = ct_case(tmp_path / "src")
    bundle = build_outputs(case.result, case.paths, case.job_key, Settings(reports={"kos": True}))
    kos = bundle.kos
    assert kos is not None
    path = tmp_path / "ko.dcm"
    assert_round_trip(kos, path)
    assert assert_valid([path]) == {}
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage
    assert kos.StudyInstanceUID == case.result.study_instance_uid
    assert kos.SeriesDescription == KO_SERIES_DESCRIPTION
    assert kos.SeriesNumber == Settings().reports.kos_series_number
    assert kos.ConceptNameCodeSequence[0].CodeValue == codes.KEY_OBJECT_TITLE.value
    explained = {e.sop_instance_uid for e in case.result.explanations}
    captures = {str(c.SOPInstanceUID) for c in bundle.captures}
    images = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    }
    assert images == explained | captures
    (text,) = [
        item.TextValue
        for item in kos.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == pydicom_codes.DCM.KeyObjectDescription.value
    ]
    assert text == summary_text(case.result)
    assert "PRESENT" in text and "research use" in text
    source = case.headers[0]
    assert str(source.PatientName) not in text and str(source.PatientID) not in text
    document = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    for uid in explained | captures:
        assert document.resolve_reference(uid)[0] == case.result.study_instance_uid
    (device,) = document.content.get_observer_contexts()
    assert device.observer_type == pydicom_codes.DCM.Device
    assert build_outputs(case.result, case.paths, case.job_key, Settings()).kos is None
    # an Indeterminate result says why, in the one-line summary
    unsure = make_result(case.study, decision=Decision.INDETERMINATE)
    assert "INDETERMINATE (no plausible SI joint found)" in summary_text(unsure)


def test_bundle_needs_a_job_key_and_a_known_sr_class(tmp_path: Path) -> None:
    case = ct_case(tmp_path / "src", n_slices=6)
    with pytest.raises(ReportError, match="non-empty job key"):
        build_outputs(case.result, case.paths, "", Settings())
    with pytest.raises(ValueError, match="distinct SOP Class UIDs"):
        Settings(reports={"sr_sop_classes": ["1.2.3"]})


def test_a_written_sr_is_reencoded_as_another_class(tmp_path: Path) -> None:
    """After a restart only the files are left: sr-1.dcm gives the same 88.22 and 88.34."""
    case = ct_case(tmp_path / "src", n_slices=6)
    first = build_outputs(case.result, case.paths, case.job_key, Settings())
    late = build_outputs(case.result, case.paths, "late", Settings(), predecessor=first.sr)
    root = Settings().node.uid_root
    for bundle, key in ((first, case.job_key), (late, "late")):
        (written,) = [p for p in bundle.write(tmp_path / key) if p.name == "sr-1.dcm"]
        stored = pydicom.dcmread(written)
        for sop_class in (EnhancedSRStorage, Comprehensive3DSRStorage, ComprehensiveSRStorage):
            again = reencode_sr(stored, sop_class, key, root)
            expected = bundle.sr_as(sop_class)
            assert again.SOPClassUID == sop_class
            assert again.SOPInstanceUID == expected.SOPInstanceUID
            assert again.ContentSequence == expected.ContentSequence
            assert (
                again.CurrentRequestedProcedureEvidenceSequence
                == expected.CurrentRequestedProcedureEvidenceSequence
            )
            for keyword in (
                "PatientName",
                "PatientID",
                "PatientBirthDate",
                "PatientSex",
                "StudyInstanceUID",
                "AccessionNumber",
                "StudyID",
                "SeriesInstanceUID",
                "SeriesNumber",
                "SeriesDescription",
                "PreliminaryFlag",
                "VerificationFlag",
            ):
                assert str(again.get(keyword)) == str(expected.get(keyword)), keyword
            assert ("PredecessorDocumentsSequence" in again) == (key == "late")
            if key == "late":
                assert again.PredecessorDocumentsSequence == expected.PredecessorDocumentsSequence
            path = tmp_path / f"{key}-{sop_class}.dcm"
            again.save_as(path, enforce_file_format=True)
            assert assert_valid([path]) == {}
    with pytest.raises(ReportError, match="expected the SR series"):
        reencode_sr(pydicom.dcmread(tmp_path / "late" / "sr-1.dcm"), EnhancedSRStorage, "x", root)
    with pytest.raises(ReportError, match="expected an SR of class"):
        reencode_sr(pydicom.dcmread(case.paths[0]), EnhancedSRStorage, case.job_key, root)
