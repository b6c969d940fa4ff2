"""``sijnode synth``: determinism, DICOM validity, truth that agrees with the pixels, CLI."""

from __future__ import annotations

import csv
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from sijnode.errors import SynthesisError
from sijnode.synth import (
    SynthStudy,
    Tissue,
    generate_ct_study,
    generate_dataset,
    generate_mr_study,
    plan_subjects,
    write_dataset,
)
from sijnode.uids import DEFAULT_UID_ROOT
from tests.conftest import require_tool

SEED = 5
BONE = (Tissue.SACRUM, Tissue.ILIUM_LEFT, Tissue.ILIUM_RIGHT)


def _write(out: Path, seed: int) -> list[SynthStudy]:
    studies = list(generate_dataset(seed, 2, 0.5, "both", n_slices=6))
    write_dataset(out, studies, {"seed": seed})
    return studies


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SynthStudy]]:
    """Two subjects (one positive), CT and MR of 6 slices each, written to disk."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, _write(out, SEED)


@pytest.fixture(scope="module")
def mr_pair() -> tuple[SynthStudy, SynthStudy]:
    """A bilateral positive and a negative MR subject at the default 20-37 slices."""
    return generate_mr_study(21, 1, True, "both"), generate_mr_study(21, 2, False)


@pytest.fixture(scope="module")
def ct_pair() -> tuple[SynthStudy, SynthStudy]:
    """A left-sided positive and a negative CT subject."""
    return (
        generate_ct_study(21, 1, True, "left", n_slices=8),
        generate_ct_study(21, 2, False, n_slices=8),
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _distance_to(labels: np.ndarray, tissue: Tissue) -> np.ndarray:
    """Distance in pixels from every pixel to the nearest pixel of ``tissue``."""
    return cv2.distanceTransform((labels != tissue).astype(np.uint8), cv2.DIST_L2, 3)


# --- determinism ---------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_differs(
    dataset: tuple[Path, list[SynthStudy]], tmp_path: Path
) -> None:
    first = _files(dataset[0])
    _write(tmp_path / "again", SEED)
    again = _files(tmp_path / "again")
    assert len(first) == 2 + 2 * (6 + 6) + 1  # two CSVs, 24 slices, synth.json
    assert sorted(first) == sorted(again)
    differing = [name for name in first if first[name] != again[name]]
    assert differing == []

    _write(tmp_path / "other", SEED + 1)
    other = _files(tmp_path / "other")
    assert other["labels.csv"] != first["labels.csv"]
    first_ct = pydicom.dcmread(dataset[0] / "sub-0001/ct/0001.dcm")
    other_ct = pydicom.dcmread(tmp_path / "other/sub-0001/ct/0001.dcm")
    assert first_ct.StudyInstanceUID != other_ct.StudyInstanceUID
    assert not np.array_equal(first_ct.pixel_array, other_ct.pixel_array)


# --- DICOM validity and headers --------------------------------------------------------------


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_dciodvfy_reports_no_errors(dataset: tuple[Path, list[SynthStudy]], modality: str) -> None:
    dciodvfy = require_tool("dciodvfy")
    files = sorted(dataset[0].glob(f"sub-*/{modality}/*.dcm"))
    assert len(files) == 12
    problems: dict[str, list[str]] = {}
    warnings = 0
    for path in files:
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        lines = (run.stdout + run.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        warnings += sum(line.startswith("Warning") for line in lines)
        if errors:
            problems[path.name] = errors
    assert problems == {}
    assert warnings <= len(files)


def test_headers_geometry_and_identifiers(dataset: tuple[Path, list[SynthStudy]]) -> None:
    root = dataset[0]
    for folder in sorted(p for p in root.glob("sub-*/*") if p.is_dir()):
        datasets = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        n = len(datasets)
        subject = int(folder.parent.name.removeprefix("sub-"))
        assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, n + 1))
        for ds in datasets:
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert int(ds.ImagesInAcquisition) == n
            assert ds.Manufacturer == "sijnode-synth"
            assert str(ds.PatientName) == f"SYNTH^SUBJECT{subject:03d}"
            assert ds.PatientID == f"SYNTH-{subject:04d}-{SEED}"
            assert ds.StudyDate == f"202401{1 + subject:02d}"
            for uid in (
                ds.StudyInstanceUID,
                ds.SeriesInstanceUID,
                ds.SOPInstanceUID,
                ds.FrameOfReferenceUID,
                ds.file_meta.MediaStorageSOPInstanceUID,
                ds.file_meta.ImplementationClassUID,
            ):
                assert uid.startswith(DEFAULT_UID_ROOT)
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert len({ds.SOPInstanceUID for ds in datasets}) == n
        assert len({ds.StudyInstanceUID for ds in datasets}) == 1

        iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        along = np.array(
            [normal @ np.array(ds.ImagePositionPatient, dtype=float) for ds in datasets]
        )
        first = datasets[0]
        if first.Modality == "CT":
            assert (first.Rows, first.Columns) == (512, 512)
            assert first.pixel_array.dtype == np.int16
            assert float(first.RescaleIntercept) == -1024 and float(first.RescaleSlope) == 1
            assert first.BodyPartExamined == "PELVIS"
            assert 0.7 <= float(first.PixelSpacing[0]) <= 0.8
            assert np.allclose(np.diff(along), -float(first.SliceThickness), atol=1e-3)
        else:
            assert (first.Rows, first.Columns) == (448, 448)
            assert first.pixel_array.dtype == np.uint16
            assert float(first.PixelSpacing[0]) == pytest.approx(250 / 448, abs=1e-5)
            assert float(first.SliceThickness) == 2.0
            assert float(first.SpacingBetweenSlices) == 2.2
            assert np.allclose(np.diff(along), 2.2, atol=1e-3)
            assert 0.8 < abs(normal[1]) < 0.95  # oblique coronal: tilted along the sacrum


def test_paths_carry_no_patient_identifiers(dataset: tuple[Path, list[SynthStudy]]) -> None:
    names = [str(p.relative_to(dataset[0])) for p in dataset[0].rglob("*")]
    assert names and not [n for n in names if re.search(r"SYNTH[-^]|SUBJECT", n)]
    assert {p.name for p in dataset[0].iterdir()} == {
        "labels.csv",
        "rois.csv",
        "synth.json",
        "sub-0001",
        "sub-0002",
    }


# --- truth agrees with the pixels ----------------------------------------------------------


def _bright_juxta_articular(study: SynthStudy, k: int) -> dict[str, int]:
    """Per side, bone pixels within 20 mm of the joint space brighter than 2.2× the marrow."""
    ds, labels = study.datasets[k], study.labelmap[k]
    image = ds.pixel_array.astype(np.float32)
    spacing = float(ds.PixelSpacing[0])
    bone = np.isin(labels, BONE)
    region = bone & (_distance_to(labels, Tissue.JOINT) * spacing <= 20)
    bright = region & (image > 2.2 * np.median(image[bone]))
    cols = np.arange(labels.shape[1])[None, :]
    # Patient left is +x, and the row direction is +x: the left ilium is on the image's right.
    mid = (
        np.nonzero(labels == Tissue.ILIUM_LEFT)[1].mean()
        + np.nonzero(labels == Tissue.ILIUM_RIGHT)[1].mean()
    ) / 2
    return {
        "left": int(np.count_nonzero(bright & (cols > mid))),
        "right": int(np.count_nonzero(bright & (cols <= mid))),
    }


def test_mr_oedema_is_where_the_slice_labels_say(mr_pair: tuple[SynthStudy, SynthStudy]) -> None:
    positive, negative = mr_pair
    for study in mr_pair:
        assert 20 <= len(study.slices) <= 37
    labels = positive.slice_labels
    assert positive.label == 1 and "11" in labels  # BME on consecutive slices (ASAS)
    assert negative.label == 0 and set(negative.slice_labels) == {"0"}
    seen = set()
    for k, truth in enumerate(positive.slices):
        counts = _bright_juxta_articular(positive, k)
        for side in ("left", "right"):
            if truth.side in (side, "both"):
                assert counts[side] >= 20, (k, side, counts)
                seen.add(side)
            else:
                assert counts[side] <= 5, (k, side, counts)
    assert seen == {"left", "right"}
    for k in range(len(negative.slices)):
        assert max(_bright_juxta_articular(negative, k).values()) <= 5


def _subchondral_hu(study: SynthStudy, tissue: Tissue) -> float:
    """Mean HU of ``tissue`` bone 2.5-8 mm from the joint space, over the whole study."""
    values = []
    for ds, labels in zip(study.datasets, study.labelmap, strict=True):
        dist = _distance_to(labels, Tissue.JOINT) * float(ds.PixelSpacing[0])
        values.append(_hu(ds)[(labels == tissue) & (dist >= 2.5) & (dist <= 8)])
    return float(np.concatenate(values).mean())


def test_ct_sclerosis_is_on_the_labelled_side(ct_pair: tuple[SynthStudy, SynthStudy]) -> None:
    positive, negative = ct_pair
    assert positive.label == 1 and positive.side == "left" and negative.label == 0
    assert set(s.side for s in positive.slices) <= {"left", "none"} and "1" in positive.slice_labels
    assert set(negative.slice_labels) == {"0"}
    left, right = (_subchondral_hu(positive, t) for t in (Tissue.ILIUM_LEFT, Tissue.ILIUM_RIGHT))
    neg_left, neg_right = (
        _subchondral_hu(negative, t) for t in (Tissue.ILIUM_LEFT, Tissue.ILIUM_RIGHT)
    )
    assert left > neg_left + 100, (left, neg_left)
    assert abs(right - neg_right) < 60, (right, neg_right)
    assert left > right + 100


def test_ct_hounsfield_units_are_realistic(ct_pair: tuple[SynthStudy, SynthStudy]) -> None:
    study = ct_pair[1]
    hu = np.stack([_hu(ds) for ds in study.datasets])
    labels = study.labelmap

    def median(*tissues: Tissue) -> float:
        return float(np.median(hu[np.isin(labels, tissues)]))

    assert median(Tissue.AIR) < -950
    assert -130 < median(Tissue.FAT) < -70
    assert 20 < median(Tissue.MUSCLE) < 70
    assert 200 < median(*BONE) < 400
    cortex = []
    for k in range(len(study.datasets)):
        bone = np.isin(labels[k], BONE).astype(np.uint8)
        rim = cv2.distanceTransform(bone, cv2.DIST_L2, 3)
        cortex.append(hu[k][(rim >= 1) & (rim <= 1.5)])
    assert np.median(np.concatenate(cortex)) > 1000


def test_roi_boxes_contain_the_ilia(dataset: tuple[Path, list[SynthStudy]]) -> None:
    root, studies = dataset
    rows = _csv(root / "rois.csv")
    mr = {s.study_instance_uid: s for s in studies if s.modality == "MR"}
    assert {r["StudyInstanceUID"] for r in rows} == set(mr)
    assert len(rows) == 2 * sum(len(s.slices) for s in mr.values())
    covered = []
    for row in rows:
        study = mr[row["StudyInstanceUID"]]
        k = int(row["InstanceNumber"]) - 1
        labels = study.labelmap[k]
        x0, y0, x1, y1 = (int(row[c]) for c in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= 448 and 0 <= y0 < y1 <= 448
        ds = pydicom.dcmread(root / study.subject_id / "mr" / f"{k + 1:04d}.dcm")
        assert row["SOPInstanceUID"] == ds.SOPInstanceUID
        own, other = (
            (Tissue.ILIUM_LEFT, Tissue.ILIUM_RIGHT)
            if row["side"] == "left"
            else (Tissue.ILIUM_RIGHT, Tissue.ILIUM_LEFT)
        )
        ilium = labels == own
        # Every iliac pixel of the box's rows lies inside the box, and the box is iliac bone.
        assert not ilium[y0:y1, :x0].any() and not ilium[y0:y1, x1:].any()
        assert ilium[y0:y1, x0:x1].mean() > 0.3
        assert not (labels[y0:y1, x0:x1] == other).any()
        # Moved inward by 0.8 × its width (Lee et al. 2021), the box covers that joint.
        shift = round(0.8 * (x1 - x0)) * (-1 if row["side"] == "left" else 1)
        joint = labels[y0:y1] == Tissue.JOINT
        side_cols = np.arange(448) > 224 if row["side"] == "left" else np.arange(448) <= 224
        joint &= side_cols[None, :]
        if joint.any():
            covered.append(joint[:, max(x0 + shift, 0) : max(x1 + shift, 0)].sum() / joint.sum())
    assert min(covered) > 0.6 and np.mean(covered) > 0.9, covered
    for study in mr.values():
        for truth in study.slices:
            boxes = {b.side: b for b in truth.rois}
            assert boxes["left"].x0 > boxes["right"].x1  # patient left on the image's right


# --- command line and API ------------------------------------------------------------------


def test_cli_writes_labels_and_rois(tmp_path: Path) -> None:
    from sijnode.cli import _register_parts, app

    if not any(c.name == "synth" for c in app.registered_commands):
        _register_parts()
    runner = CliRunner()
    help_result = runner.invoke(app, ["synth", "--help"])
    assert help_result.exit_code == 0 and "--positive-fraction" in help_result.output

    root = "1.2.826.0.1.3680043.9999."
    out = tmp_path / "out"
    args = ["synth", "--modality", "mr", "--subjects", "2", "--seed", "3", "--slices", "5"]
    result = runner.invoke(app, [*args, "--out", str(out)], env={"SIJNODE_NODE__UID_ROOT": root})
    assert result.exit_code == 0, result.output
    assert "sub-0001" in result.output and "sub-0002/mr" in result.output
    labels = _csv(out / "labels.csv")
    assert [(r["subject"], r["modality"], r["slices"]) for r in labels] == [
        ("sub-0001", "MR", "5"),
        ("sub-0002", "MR", "5"),
    ]
    assert sorted(r["label"] for r in labels) == ["0", "1"]
    assert all(r["StudyInstanceUID"].startswith(root) for r in labels)
    assert all(len(r["slice_labels"]) == 5 for r in labels)
    assert len(_csv(out / "rois.csv")) == 2 * 2 * 5
    assert len(list(out.glob("sub-*/mr/*.dcm"))) == 10

    again = runner.invoke(app, [*args, "--out", str(out)])
    assert again.exit_code != 0 and isinstance(again.exception, SynthesisError)
    too_many = runner.invoke(app, ["synth", "--slices", "100", "--out", str(tmp_path / "new")])
    assert isinstance(too_many.exception, SynthesisError) and not (tmp_path / "new").exists()


def test_plan_has_the_requested_share_of_positives() -> None:
    plan = plan_subjects(9, 10, 0.3)
    assert plan == plan_subjects(9, 10, 0.3)
    assert sum(p.positive for p in plan) == 3
    assert {p.side for p in plan if p.positive} <= {"left", "right", "both"}
    assert {p.side for p in plan if not p.positive} == {"none"}
    assert [p.index for p in plan] == list(range(1, 11))


@pytest.mark.parametrize(
    "call",
    [
        lambda: generate_ct_study(1, 1, True, "none"),
        lambda: generate_ct_study(1, 1, False, "left"),
        lambda: generate_ct_study(1, 1, True, "up"),  # type: ignore[arg-type]
        lambda: generate_ct_study(1, 1, False, n_slices=301),
        lambda: generate_ct_study(1, 0, False, n_slices=2),
        lambda: generate_ct_study(-1, 1, False, n_slices=2),
        lambda: generate_mr_study(1, 1, False, n_slices=3),
        lambda: generate_mr_study(1, 1, False, n_slices=4, uid_root="1.2.3"),
        lambda: plan_subjects(1, 4, 1.5),
        lambda: generate_dataset(1, 1, 0.5, "pet"),  # type: ignore[arg-type]
        lambda: generate_dataset(1, 1, 0.5, "both", n_slices=100),  # MR takes at most 64
    ],
)
def test_bad_parameters_raise_synthesis_error(call: object) -> None:
    with pytest.raises(SynthesisError):
        call()  # type: ignore[operator]


def test_write_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(SynthesisError, match="empty"):
        write_dataset(tmp_path, [])


def test_a_scan_on_29_february_gives_a_valid_age() -> None:
    """Subject 59 is scanned on 2024-02-29; most birth years have no such day."""
    from datetime import date

    from sijnode.synth.dicom import BASE_DATE, make_patient

    for seed in range(20):
        patient = make_patient(seed, 59, np.random.default_rng(seed))
        birth = date.fromisoformat(
            f"{patient.birth_date[:4]}-{patient.birth_date[4:6]}-{patient.birth_date[6:]}"
        )
        scan = BASE_DATE.replace(month=2, day=29)
        had_birthday = (birth.month, birth.day) <= (2, 29)
        assert int(patient.age[:3]) == scan.year - birth.year - (0 if had_birthday else 1)
