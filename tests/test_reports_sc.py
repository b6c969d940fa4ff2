"""Grad-CAM secondary captures: attributes, pixels, dciodvfy, JPEG-LS (DICOM-OUTPUTS.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from sijnode.errors import ReportError
from sijnode.reports.build import ReportBundle, build_outputs
from sijnode.reports.sc import (
    BANNER_TITLE,
    SC_SERIES_DESCRIPTION,
    Rendering,
    banner_lines,
    blend,
    patient_orientation,
    windowed,
)
from sijnode.settings import Settings
from tests.test_reports_inputs import Case, assert_round_trip, assert_valid, ct_case, mr_case

PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
)


@pytest.fixture(scope="module", params=["CT", "MR"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp(request.param.lower())
    return ct_case(tmp) if request.param == "CT" else mr_case(tmp)


@pytest.fixture(scope="module")
def bundle(case: Case) -> ReportBundle:
    return build_outputs(case.result, case.paths, case.job_key, Settings())


def _sources(case: Case) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in case.paths)}


def test_captures_validate_and_round_trip(bundle: ReportBundle, tmp_path: Path) -> None:
    paths = []
    for n, sc in enumerate(bundle.captures, start=1):
        paths.append(tmp_path / f"sc-{n}.dcm")
        back = assert_round_trip(sc, paths[-1])
        assert np.array_equal(back.pixel_array, sc.pixel_array)
    assert assert_valid(paths) == {}  # no warnings either


def test_capture_attributes(case: Case, bundle: ReportBundle) -> None:
    sources = _sources(case)
    settings = Settings()
    series = {sc.SeriesInstanceUID for sc in bundle.captures}
    assert len(series) == 1 and not series & {s.SeriesInstanceUID for s in sources.values()}
    assert len(bundle.captures) == len(case.result.explanations)
    for sc, explanation in zip(bundle.captures, case.result.explanations, strict=True):
        source = sources[explanation.sop_instance_uid]
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        for keyword in PATIENT_AND_STUDY:
            assert str(sc.get(keyword)) == str(source.get(keyword)), keyword
        assert sc.SeriesNumber == settings.reports.sc_series_number
        assert sc.SeriesDescription == SC_SERIES_DESCRIPTION
        assert "research use" in sc.SeriesDescription
        assert sc.InstanceNumber == source.InstanceNumber
        assert sc.BurnedInAnnotation == "YES"
        assert sc.ConversionType == "WSD"
        (ref,) = sc.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID
        assert case.result.algorithm.version in sc.DerivationDescription
        assert tuple(sc.PatientOrientation) == patient_orientation(source)
        assert sc.ImageLaterality == "B"
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
        assert [float(v) for v in sc.PixelSpacing] == [float(v) for v in source.PixelSpacing]
        assert sc.SOPInstanceUID.startswith(settings.node.uid_root)


def test_patient_orientation_from_the_geometry(case: Case) -> None:
    source = pydicom.dcmread(case.paths[0], stop_before_pixels=True)
    assert patient_orientation(source) == (("L", "P") if source.Modality == "CT" else ("L", "F"))


def test_capture_pixels_show_the_slice_the_heatmap_and_the_banner(
    case: Case, bundle: ReportBundle
) -> None:
    sources = _sources(case)
    gradcam = Settings().pipelines[case.result.pipeline].gradcam
    for sc, explanation in zip(bundle.captures, case.result.explanations, strict=True):
        rgb = sc.pixel_array
        grey = windowed(sources[explanation.sop_instance_uid])
        heat = explanation.heatmap >= round(gradcam.threshold * 255)
        region = explanation.peak_region
        untouched = ~heat
        untouched[: rgb.shape[0] // 6] = False  # banner
        r0, r1 = int(region.row0) - 3, int(region.row1) + 3
        c0, c1 = int(region.column0) - 3, int(region.column1) + 3
        untouched[r0:r1, c0:c1] = False  # peak box
        # the source, windowed, unchanged outside the heatmap
        assert np.array_equal(rgb[untouched], np.repeat(grey[untouched][:, None], 3, axis=1))
        # colour at the peak: the JET map of 255 is dark red
        row, column = np.unravel_index(int(np.argmax(explanation.heatmap)), grey.shape)
        peak = rgb[row, column].astype(int)
        assert peak[0] > peak[2] + 40
        # a dark banner with white text at the top
        band, under = rgb[:12].astype(int), grey[:12].astype(int)
        text = np.any(band > under[:, :, None] * 0.25 + 1, axis=2)
        assert text.sum() > 300 and band.max() == 255
        assert np.all(band[text][:, 0] == band[text][:, 2])  # white (grey) text only
        lines = banner_lines(case.result, explanation)
        assert lines[0] == BANNER_TITLE
        assert any(case.result.algorithm.version in line for line in lines)
        assert any(f"{case.result.probability:.3f}" in line for line in lines)
        source = sources[explanation.sop_instance_uid]
        for identifier in (source.PatientName, source.PatientID, source.AccessionNumber):
            assert all(str(identifier) not in line for line in lines)


def test_blend_threshold_and_alpha() -> None:
    grey = np.full((8, 8), 100, np.uint8)
    heat = np.zeros((8, 8), np.uint8)
    heat[2, 3], heat[5, 5] = 255, 60
    out = blend(grey, heat, Rendering(threshold=0.5, alpha=0.4))
    coloured = np.any(out != 100, axis=2)
    assert coloured[2, 3] and coloured.sum() == 1  # 60 < 0.5 * 255: not blended
    assert np.array_equal(blend(grey, heat, Rendering(threshold=0.0, alpha=0.0))[:, :, 0], grey)
    with pytest.raises(ReportError, match="uint8 heatmap of the slice's shape"):
        blend(grey, np.zeros((4, 4), np.uint8), Rendering())
    with pytest.raises(ReportError, match="got float32"):
        blend(grey, heat.astype(np.float32), Rendering())


def test_jpegls_variant_is_lossless(case: Case, bundle: ReportBundle, tmp_path: Path) -> None:
    settings = Settings(reports={"sc_jpegls": True})
    jpegls = build_outputs(case.result, case.paths, case.job_key, settings)
    paths = []
    for n, (sc, plain) in enumerate(zip(jpegls.captures, bundle.captures, strict=True), start=1):
        assert sc.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert sc.SOPInstanceUID == plain.SOPInstanceUID
        paths.append(tmp_path / f"sc-{n}.dcm")
        sc.save_as(paths[-1], enforce_file_format=True)
        back = pydicom.dcmread(paths[-1])
        assert back.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert np.array_equal(back.pixel_array, plain.pixel_array)
        assert paths[-1].stat().st_size < len(plain.PixelData)  # smaller (noisy MR: ~0.6)
    assert assert_valid(paths) == {}
    # re-encoding for a destination keeps the instance and the pixels, both ways
    for plain, converted in zip(
        bundle.captures, jpegls.captures_in(ExplicitVRLittleEndian), strict=True
    ):
        assert converted.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert converted.SOPInstanceUID == plain.SOPInstanceUID
        assert np.array_equal(converted.pixel_array, plain.pixel_array)
    compressed = bundle.captures_in(JPEGLSLossless)
    out = [tmp_path / f"re-{n}.dcm" for n in range(len(compressed))]
    for ds, plain, path in zip(compressed, bundle.captures, out, strict=True):
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert ds.SOPInstanceUID == plain.SOPInstanceUID
        ds.save_as(path, enforce_file_format=True)
        assert np.array_equal(pydicom.dcmread(path).pixel_array, plain.pixel_array)
    assert assert_valid(out) == {}
    assert bundle.captures[0].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # untouched


def test_gradcam_disabled_emits_no_capture(case: Case) -> None:
    settings = Settings(pipelines={case.result.pipeline: {"gradcam": {"enabled": False}}})
    bundle = build_outputs(case.result, case.paths, case.job_key, settings)
    assert bundle.captures == ()
    # the SR keeps the region groups (they come from the result) and references no capture
    (study,) = bundle.sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == case.result.slices[0].series_instance_uid
