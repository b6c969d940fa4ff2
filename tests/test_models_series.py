"""Series reading: order along the slice normal, and clear errors for bad series."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from sijnode.errors import SeriesError
from sijnode.models.registry import PredictOptions, StudyInput, get_pipeline
from sijnode.models.series import read_series
from sijnode.synth import generate_ct_study
from tests.models_support import ct_checkpoint


@pytest.fixture(scope="module")
def datasets() -> list[Dataset]:
    return generate_ct_study(seed=2, subject_index=1, positive=False, n_slices=5).datasets


def _write(tmp_path: Path, datasets: list[Dataset]) -> list[Path]:
    paths = []
    for k, ds in enumerate(datasets):
        path = tmp_path / f"x{k:02d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _copies(datasets: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(ds) for ds in datasets]


def test_order_follows_position_not_instance_number(
    tmp_path: Path, datasets: list[Dataset]
) -> None:
    copies = _copies(datasets)
    numbers = list(range(1, len(copies) + 1))
    random.Random(4).shuffle(numbers)
    for ds, number in zip(copies, numbers, strict=True):
        ds.InstanceNumber = number
    shuffled = copies[:]
    random.Random(5).shuffle(shuffled)
    series = read_series("1.2", _write(tmp_path, shuffled))
    by_z = sorted(copies, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [s.sop_instance_uid for s in series.slices] == [ds.SOPInstanceUID for ds in by_z]
    positions = [s.position for s in series.slices]
    assert positions == sorted(positions)
    assert [s.instance_number for s in series.slices] == [ds.InstanceNumber for ds in by_z]


def test_reversed_positions_and_flipped_normal(tmp_path: Path, datasets: list[Dataset]) -> None:
    copies = _copies(datasets)
    positions = [list(ds.ImagePositionPatient) for ds in copies]
    for ds, position in zip(copies, reversed(positions), strict=True):
        ds.ImagePositionPatient = position  # positions now increase with InstanceNumber
    series = read_series(
        "1.2", _write(tmp_path / "a", copies) if (tmp_path / "a").mkdir() is None else []
    )
    assert [s.instance_number for s in series.slices] == [1, 2, 3, 4, 5]
    # Column direction reversed: the normal flips, the order (along +z) stays.
    for ds in copies:
        iop = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImageOrientationPatient = iop[:3] + [-v for v in iop[3:]]
    (tmp_path / "b").mkdir()
    flipped = read_series("1.2", _write(tmp_path / "b", copies))
    assert [s.instance_number for s in flipped.slices] == [1, 2, 3, 4, 5]


def test_decode_applies_rescale_and_reads_jpeg_ls(tmp_path: Path, datasets: list[Dataset]) -> None:
    copies = _copies(datasets)
    expected = copies[0].pixel_array.astype(np.float32) - 1024.0
    copies[0].compress(JPEGLSLossless)
    series = read_series("1.2", _write(tmp_path, copies))
    index = next(
        i for i, s in enumerate(series.slices) if s.sop_instance_uid == copies[0].SOPInstanceUID
    )
    np.testing.assert_array_equal(series.decode(index), expected)


def test_decode_reads_the_pixel_element_at_the_header_offset(
    tmp_path: Path, datasets: list[Dataset]
) -> None:
    """Decode parses only the pixel data element where the header read stopped; deflated
    files (no such offset) are read whole; either way the pixels are pydicom's."""
    copies = _copies(datasets)
    copies[1].compress(RLELossless)
    copies[2].file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    copies[3].file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    series = read_series("1.2", _write(tmp_path, copies))
    for i, header in enumerate(series.slices):
        ds = pydicom.dcmread(header.path)
        deflated = ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
        assert (header.pixels is None) == deflated
        expected = ds.pixel_array.astype(np.float32) * np.float32(header.rescale_slope)
        expected += np.float32(header.rescale_intercept)
        np.testing.assert_array_equal(series.decode(i), expected)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda ds: delattr(ds, "ImagePositionPatient"), "missing geometry.*ImagePositionPatient"),
        (lambda ds: delattr(ds, "PixelSpacing"), "missing geometry.*PixelSpacing"),
        (lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1]), "6 finite numbers"),
        (
            lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
            "inconsistent geometry",
        ),
        (lambda ds: setattr(ds, "Rows", 256), "mixed sizes: expected 512×512"),
        (lambda ds: setattr(ds, "NumberOfFrames", 3), "multi-frame object with 3 frames"),
        (lambda ds: setattr(ds, "Modality", "MR"), "expected Modality CT, found MR"),
    ],
)
def test_bad_series_raise_series_error(
    tmp_path: Path, datasets: list[Dataset], damage, message: str
) -> None:  # type: ignore[no-untyped-def]
    copies = _copies(datasets)
    damage(copies[2])
    with pytest.raises(SeriesError, match=message):
        read_series("1.2", _write(tmp_path, copies), modality="CT")


def test_two_slices_at_one_position(tmp_path: Path, datasets: list[Dataset]) -> None:
    copies = _copies(datasets)
    copies[1].ImagePositionPatient = copies[0].ImagePositionPatient
    with pytest.raises(SeriesError, match="expected one slice per position along the normal"):
        read_series("1.2", _write(tmp_path, copies))


def test_too_few_slices(tmp_path: Path, datasets: list[Dataset]) -> None:
    with pytest.raises(SeriesError, match="expected at least 3 slices, found 2"):
        read_series("1.2", _write(tmp_path, datasets[:2]), min_slices=3)


def test_corrupt_files(tmp_path: Path, datasets: list[Dataset]) -> None:
    paths = _write(tmp_path, _copies(datasets))
    paths[1].write_bytes(b"not a dicom file at all")
    with pytest.raises(SeriesError, match=r"x01\.dcm: expected a readable DICOM file"):
        read_series("1.2", paths)
    paths = _write(tmp_path, _copies(datasets))
    paths[1].write_bytes(paths[1].read_bytes()[:-50000])  # pixel data cut short
    series = read_series("1.2", paths)
    index = next(i for i, s in enumerate(series.slices) if s.path == paths[1])
    with pytest.raises(SeriesError, match=r"x01\.dcm: expected decodable pixel data"):
        series.decode(index)


def test_pipeline_raises_series_error_for_missing_geometry(
    tmp_path: Path, datasets: list[Dataset]
) -> None:
    torch.set_num_threads(1)
    copies = _copies(datasets)
    del copies[3].ImagePositionPatient
    (tmp_path / "s").mkdir()
    paths = _write(tmp_path / "s", copies)
    path, _ = ct_checkpoint(tmp_path)
    pipeline = get_pipeline("ct").load({"model": path}, "cpu", PredictOptions(batch_size=2))
    study = StudyInput.from_paths(str(copies[0].StudyInstanceUID), {"1.2": paths})
    with pytest.raises(SeriesError, match="missing geometry"):
        pipeline.predict(study)
