"""The TID 1500 SR of a job, for synthetic CT and MR studies (DICOM-OUTPUTS.md).

Every SR class (88.33, 88.22, 88.34) is written, validated with dciodvfy (zero errors),
dumped with DCMTK's dsrdump, read back with pydicom and highdicom's ``srread``, and
checked for placement, references, codes and deterministic UIDs.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from sijnode.errors import ReportError
from sijnode.models.result import Decision
from sijnode.reports import codes
from sijnode.reports.build import ReportBundle, build_outputs
from sijnode.reports.sr import (
    SR_SERIES_DESCRIPTION,
    SRContent,
    build_measurement_report,
    encode_sr,
    predecessor_reference,
)
from sijnode.reports.uids import JobUIDs
from sijnode.settings import Settings
from sijnode.uids import make_uid
from tests.conftest import require_tool
from tests.test_reports_inputs import (
    Case,
    assert_round_trip,
    assert_valid,
    ct_case,
    make_result,
    mr_case,
)

SR_CLASSES = [ComprehensiveSRStorage, EnhancedSRStorage, Comprehensive3DSRStorage]
PATIENT_MODULE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
STUDY_MODULE = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber")


@pytest.fixture(scope="module", params=["CT", "MR"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp(request.param.lower())
    return ct_case(tmp) if request.param == "CT" else mr_case(tmp)


@pytest.fixture(scope="module")
def bundle(case: Case) -> ReportBundle:
    return build_outputs(case.result, case.paths, case.job_key, Settings())


def _texts(group: Sequence[Dataset]) -> dict[str, list[str]]:
    """TEXT items directly in a measurement group, by concept meaning."""
    out: dict[str, list[str]] = {}
    for item in find_content_items(group[0], value_type=hd.sr.ValueTypeValues.TEXT):
        out.setdefault(item.name.meaning, []).append(item.value)
    return out


def _group_evaluation(group: object, finding: codes.PostCoordinatedFinding) -> object:
    evaluations = group.get_qualitative_evaluations(name=finding.finding_type)  # type: ignore[attr-defined]
    assert len(evaluations) == 1
    return evaluations[0].value


@pytest.mark.parametrize("sop_class", SR_CLASSES)
def test_every_sr_class_validates_and_parses(
    case: Case, bundle: ReportBundle, sop_class: str, tmp_path: Path
) -> None:
    sr = bundle.sr_as(sop_class)
    assert sr.SOPClassUID == sop_class
    path = tmp_path / "sr.dcm"
    back = assert_round_trip(sr, path)
    warnings = assert_valid([path])
    assert warnings == {}, warnings  # standard codes only: no warning either
    dump = subprocess.run(
        [require_tool("dsrdump"), str(path)], capture_output=True, text=True, check=False
    )
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert "PRELIMINARY" in dump.stdout and "UNVERIFIED" in dump.stdout
    assert back.ContentSequence == sr.ContentSequence
    # same content, same series, one instance per class
    assert sr.SeriesInstanceUID == bundle.sr.SeriesInstanceUID
    assert (sr.SOPInstanceUID == bundle.sr.SOPInstanceUID) == (sop_class == SR_CLASSES[0])


def test_sr_is_a_new_series_in_the_original_study(case: Case, bundle: ReportBundle) -> None:
    sr, source = bundle.sr, case.headers[0]
    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.Modality == "SR"
    for keyword in PATIENT_MODULE + STUDY_MODULE:
        assert str(sr.get(keyword)) == str(source.get(keyword)), keyword
    assert sr.StudyInstanceUID == case.result.study_instance_uid
    assert sr.SeriesInstanceUID not in {h.SeriesInstanceUID for h in case.headers}
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION
    assert "research use" in sr.SeriesDescription
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.SeriesNumber == Settings().reports.sr_series_number
    assert sr.SOPInstanceUID.startswith(Settings().node.uid_root)
    assert "PredecessorDocumentsSequence" not in sr


def test_sr_references_the_source_images_and_the_captures(case: Case, bundle: ReportBundle) -> None:
    (study,) = bundle.sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == case.result.study_instance_uid
    referenced = {
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID)
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    sources = {(h.SOPClassUID, h.SOPInstanceUID) for h in case.headers}
    captures = {(c.SOPClassUID, c.SOPInstanceUID) for c in bundle.captures}
    assert len(captures) == len(case.result.explanations) == 3
    assert referenced == sources | captures
    assert "PertinentOtherEvidenceSequence" not in bundle.sr


def test_srread_finds_the_decision_group_then_the_region_groups(
    case: Case, bundle: ReportBundle, tmp_path: Path
) -> None:
    path = tmp_path / "sr.dcm"
    bundle.sr.save_as(path, enforce_file_format=True)
    report = hd.sr.srread(path).content
    assert isinstance(report, hd.sr.MeasurementReport)
    result = case.result
    finding = codes.finding_codes(result.finding)

    (decision,) = report.get_image_measurement_groups()
    assert decision.finding_type == finding.finding_type
    sites = decision.finding_sites
    assert [s.value for s in sites] == list(finding.sites)
    assert all(s.laterality == codes.laterality_code(result.laterality) for s in sites)
    assert _group_evaluation(decision, finding) == codes.DECISION[result.decision]
    (probability,) = decision.get_measurements(name=codes.PROBABILITY)
    assert probability.value == pytest.approx(result.probability, abs=1e-6)
    assert probability.unit == codes.NO_UNITS
    assert decision.tracking_uid is not None
    assert "decision" in decision.tracking_identifier
    assert {s.referenced_sop_instance_uid for s in decision.source_images} == {
        e.sop_instance_uid for e in result.explanations
    }
    # TID 4019 with the thresholds, in the decision group
    algorithm = _texts(decision)
    assert algorithm["Algorithm Name"] == [result.algorithm.name]
    assert algorithm["Algorithm Version"] == [result.algorithm.version]
    assert algorithm["Algorithm Manufacturer"] == [result.algorithm.manufacturer]
    parameters = algorithm["Algorithm Parameters"]
    assert f"threshold={result.threshold}" in parameters
    assert f"slice_threshold={result.slice_threshold}" in parameters
    assert f"aggregation={result.aggregation}" in parameters
    assert f"weights_sha256={result.algorithm.parameters['weights_sha256']}" in parameters
    (family,) = find_content_items(decision[0], name=pydicom_codes.DCM.AlgorithmFamily)
    assert family.value == codes.ALGORITHM_FAMILY

    regions = report.get_planar_roi_measurement_groups()
    assert len(regions) == len(result.explanations)
    for group, explanation in zip(regions, result.explanations, strict=True):
        texts = _texts(group)
        assert texts["Algorithm Version"] == [result.algorithm.version]
        assert texts["Algorithm Name"] == [result.algorithm.name]
        assert "Algorithm Parameters" not in texts  # they are the decision group's
        assert group.reference_type == pydicom_codes.DCM.ImageRegion
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = [tuple(p) for p in group.roi.value]
        assert points == explanation.peak_region.polyline()
        assert points[0] == points[-1]  # closed
        (source,) = group.roi.ContentSequence
        assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
            explanation.sop_instance_uid
        )
        (score,) = group.get_measurements(name=codes.PROBABILITY)
        assert score.value == pytest.approx(explanation.score, abs=1e-6)
        side = codes.laterality_code(explanation.laterality)
        assert group.finding_sites[0].value == codes.SACROILIAC_JOINT
        assert group.finding_sites[0].laterality == side
        positive = next(
            s.positive for s in result.slices if s.sop_instance_uid == explanation.sop_instance_uid
        )
        expected = Decision.PRESENT if positive else Decision.ABSENT
        assert _group_evaluation(group, finding) == codes.DECISION[expected]


def test_the_outputs_are_deterministic(case: Case, bundle: ReportBundle) -> None:
    again = build_outputs(case.result, case.paths, case.job_key, Settings())
    assert again.sr.SOPInstanceUID == bundle.sr.SOPInstanceUID
    assert again.sr.SeriesInstanceUID == bundle.sr.SeriesInstanceUID
    assert [c.SOPInstanceUID for c in again.captures] == [c.SOPInstanceUID for c in bundle.captures]
    assert again.sr.ContentSequence == bundle.sr.ContentSequence
    other = build_outputs(case.result, case.paths, case.job_key + "-other", Settings())
    assert other.sr.SOPInstanceUID != bundle.sr.SOPInstanceUID
    assert not {c.SOPInstanceUID for c in other.captures} & {
        c.SOPInstanceUID for c in bundle.captures
    }


def test_superseding_sr_carries_the_predecessor(
    case: Case, bundle: ReportBundle, tmp_path: Path
) -> None:
    earlier = bundle.sr
    later = build_outputs(
        case.result, case.paths, case.job_key + "-late", Settings(), predecessor=earlier
    )
    (study,) = later.sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    (item,) = series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    assert item.ReferencedSOPClassUID == earlier.SOPClassUID
    # also from a bare reference (what the delivery audit records), in every class
    reference = predecessor_reference(
        earlier.StudyInstanceUID,
        earlier.SeriesInstanceUID,
        earlier.SOPClassUID,
        earlier.SOPInstanceUID,
    )
    from_ref = build_outputs(
        case.result, case.paths, case.job_key + "-late", Settings(), predecessor=reference
    )
    paths = []
    for n, sop_class in enumerate(SR_CLASSES):
        sr = from_ref.sr_as(sop_class)
        assert sr.PredecessorDocumentsSequence == later.sr.PredecessorDocumentsSequence
        paths.append(tmp_path / f"sr-{n}.dcm")
        sr.save_as(paths[-1], enforce_file_format=True)
    assert assert_valid(paths) == {}


@pytest.mark.parametrize("decision", [Decision.ABSENT, Decision.INDETERMINATE])
def test_a_result_without_explanations(decision: Decision, tmp_path: Path) -> None:
    case = ct_case(tmp_path / "src", n_slices=6)
    result = make_result(case.study, n_explained=0, decision=decision)
    bundle = build_outputs(result, case.paths, case.job_key, Settings(reports={"kos": True}))
    assert bundle.captures == () and bundle.kos is None
    paths = bundle.write(tmp_path / "out")
    assert [p.name for p in paths] == ["sr-1.dcm"]
    assert assert_valid(paths) == {}
    report = hd.sr.srread(paths[0]).content
    (group,) = report.get_image_measurement_groups()
    finding = codes.finding_codes(result.finding)
    assert _group_evaluation(group, finding) == codes.DECISION[decision]
    assert report.get_planar_roi_measurement_groups() == []


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    case = ct_case(tmp_path / "src", n_slices=6)
    with pytest.raises(ReportError, match=r"explained slice .* missing"):
        build_outputs(case.result, case.paths[:1], case.job_key, Settings())
    with pytest.raises(ReportError, match="expected an SR SOP class"):
        build_outputs(case.result, case.paths, case.job_key, Settings()).sr_as("1.2.3")
    other = ct_case(tmp_path / "other", n_slices=6, subject=3)
    with pytest.raises(ReportError, match="expected source images of study"):
        build_outputs(case.result, case.paths + other.paths, case.job_key, Settings())
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(ReportError, match="readable DICOM source image"):
        build_outputs(case.result, [tmp_path / "junk.dcm"], case.job_key, Settings())
    with pytest.raises(ReportError, match="non-empty job key"):
        build_outputs(case.result, case.paths, "", Settings())


def test_a_300_slice_report_with_8_regions_stays_small(tmp_path: Path) -> None:
    """DICOM-OUTPUTS.md measured 24-57 KB for 300 slices and 8 region groups.

    The evidence of 300 slices with 64-character UIDs (as synth and many scanners make
    them) is 34 KB of that alone.
    """
    case = ct_case(tmp_path / "src", n_slices=12)
    result = make_result(case.study, n_explained=8)
    headers = case.headers
    root = Settings().node.uid_root
    for n in range(300 - len(headers)):
        clone = copy.deepcopy(headers[n % len(headers)])
        clone.SOPInstanceUID = make_uid(root, ["clone", str(n)])  # full-length UIDs, as synth's
        assert len(clone.SOPInstanceUID) >= 60
        headers.append(clone)
    uids = JobUIDs(root, case.job_key)
    report = build_measurement_report(result, headers, uids, "SIJNODE")
    sr = encode_sr(SRContent(report, tuple(headers), uids, 9901), ComprehensiveSRStorage)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert len(hd.sr.srread(path).content.get_planar_roi_measurement_groups()) == 8
    assert path.stat().st_size < 58 * 1024
