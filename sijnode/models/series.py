"""Spool paths -> one series as ordered slices with geometry, decoded on demand.

Slices are ordered by their position along the slice normal (PS3.3 C.7.6.2.1.1: the
normal is row × column of ImageOrientationPatient), never by InstanceNumber. The normal's
sign is fixed so that its largest component is positive (axial: towards the head;
coronal: towards the back), so a series written in either direction gives the same order:
for the pelvis, lower to upper (Lee et al. 2021 §2.4). Headers are read first without
pixels; pixels are decoded later, in worker threads (:func:`prefetch`), with the
pylibjpeg plugins and, for JPEG-LS, pyjpegls. Decoding reads only the pixel data element,
at the offset where the header read stopped (:class:`PixelSource`), not the header again.
"""

from __future__ import annotations

import itertools
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.pixels import pixel_array
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, JPEGLSLossless, JPEGLSNearLossless

from sijnode.errors import SeriesError

#: Orientation cosines of two slices may differ by this much and still be one stack.
ORIENTATION_TOLERANCE = 1e-3

#: The pixel data elements ``stop_before_pixels`` stops at (PS3.5 7.1: float, double, int).
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)

_END = object()
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PixelSource:
    """Where a slice's pixel data element starts in its file, and the header elements that
    describe it (Image Pixel module, group 0028; offset tables, 7FE0): kept from the header
    read so that decoding parses the pixel data element only, not the header again."""

    offset: int
    transfer_syntax: UID
    implicit_vr: bool
    little_endian: bool
    description: Dataset


@dataclass(frozen=True)
class SliceHeader:
    """One slice's identity and geometry, from its header."""

    path: Path
    sop_instance_uid: str
    instance_number: int | None
    #: Position along the slice normal (mm).
    position: float
    rescale_slope: float
    rescale_intercept: float
    #: None: decode reads the whole file again (e.g. deflated data sets).
    pixels: PixelSource | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Series:
    """An ordered single-frame stack: geometry shared by every slice."""

    series_instance_uid: str
    modality: str
    rows: int
    columns: int
    #: ImageOrientationPatient: row direction cosines then column direction cosines.
    orientation: tuple[float, float, float, float, float, float]
    #: PixelSpacing: (row spacing, column spacing) in mm.
    pixel_spacing: tuple[float, float]
    #: Ordered along the normal (see the module docstring).
    slices: tuple[SliceHeader, ...]

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def column_towards_patient_left(self) -> bool:
        """True when increasing column index points to the patient's left (+x, LPS)."""
        return self.orientation[0] >= 0

    def decode(self, index: int) -> npt.NDArray[np.float32]:
        """Pixels of slice ``index`` as float32 after the modality rescale (CT: HU)."""
        header = self.slices[index]
        ds = _read_pixels(header.path, header.pixels) if header.pixels is not None else None
        if ds is None:
            ds = _read(header.path, stop_before_pixels=False)
        return decode_pixels(ds, header, (self.rows, self.columns))


def _read(path: Path, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise SeriesError(f"{path.name}: expected a readable DICOM file: {exc}") from exc


def _read_header(path: Path) -> tuple[Dataset, PixelSource | None]:
    """The header without pixels and where its pixel data starts (None if unknown)."""
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            offset = f.tell()
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise SeriesError(f"{path.name}: expected a readable DICOM file: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    implicit_vr, little_endian = ds.original_encoding
    if syntax is None or syntax == DeflatedExplicitVRLittleEndian or implicit_vr is None:
        return ds, None  # deflated: the offset is one in the inflated stream
    description = Dataset(
        {tag: ds.get_item(tag) for tag in ds.keys() if tag >> 16 in (0x0028, 0x7FE0)}
    )
    return ds, PixelSource(offset, UID(syntax), implicit_vr, bool(little_endian), description)


def _read_pixels(path: Path, source: PixelSource) -> Dataset | None:
    """The pixel data element read at ``source.offset`` with the header's description;
    None where the file does not hold a pixel data element there (then read it whole)."""
    try:
        with open(path, "rb") as f:
            f.seek(source.offset)
            found = read_dataset(f, source.implicit_vr, source.little_endian)
    except (OSError, EOFError, ValueError, KeyError, struct.error):
        return None
    tags = list(found.keys())
    if not tags or int(tags[0]) not in PIXEL_TAGS:
        return None
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = source.transfer_syntax
    ds.set_original_encoding(source.implicit_vr, source.little_endian)
    ds.update(source.description)
    ds.update(found)
    return ds


def decode_pixels(
    ds: Dataset, header: SliceHeader, shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Decode one slice (pylibjpeg plugins; pyjpegls for JPEG-LS) and apply the rescale.

    ``pydicom.pixels.pixel_array``: what ``ds.pixel_array`` calls, without its cache checks
    (they walk the data set twice per slice).
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    plugin = "pyjpegls" if syntax in (JPEGLSLossless, JPEGLSNearLossless) else ""
    try:
        pixels = pixel_array(ds, decoding_plugin=plugin)
    except (AttributeError, ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise SeriesError(
            f"{header.path.name}: expected decodable pixel data ({syntax}): {exc}"
        ) from exc
    if pixels.shape != shape:
        raise SeriesError(
            f"{header.path.name}: expected pixel data of shape {shape}, found {pixels.shape}"
        )
    out = pixels.astype(np.float32)
    if header.rescale_slope != 1.0:
        out *= np.float32(header.rescale_slope)
    if header.rescale_intercept != 0.0:
        out += np.float32(header.rescale_intercept)
    return out


def _floats(ds: Dataset, keyword: str, count: int, path: Path) -> tuple[float, ...]:
    value = ds.get(keyword)
    try:
        numbers = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError) as exc:
        raise SeriesError(
            f"{path.name}: expected {count} numbers in {keyword}, found {value!r}"
        ) from exc
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise SeriesError(
            f"{path.name}: missing geometry: expected {count} finite numbers in {keyword}, "
            f"found {value!r}"
        )
    return numbers


def read_series(
    series_instance_uid: str,
    paths: Iterable[Path],
    *,
    min_slices: int = 1,
    modality: str | None = None,
) -> Series:
    """Read headers, check that the files form one stack, and order them along the normal.

    Raises :class:`SeriesError` saying what was expected and found: unreadable files,
    multi-frame objects, missing or inconsistent geometry, mixed sizes, duplicate
    positions, too few slices.
    """
    paths = list(paths)
    if len(paths) < min_slices:
        raise SeriesError(
            f"series {series_instance_uid}: expected at least {min_slices} slices, "
            f"found {len(paths)}"
        )
    first: tuple[int, int, tuple[float, ...], tuple[float, ...], str] | None = None
    headers: list[tuple[tuple[float, ...], SliceHeader]] = []
    for path in paths:
        ds, pixels = _read_header(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames != 1:
            raise SeriesError(
                f"{path.name}: expected single-frame slices, found a multi-frame object "
                f"with {frames} frames (enhanced multi-frame is not read by this pipeline)"
            )
        if "Rows" not in ds or "Columns" not in ds:
            raise SeriesError(f"{path.name}: expected Rows and Columns, found none")
        rows, columns = int(ds.Rows), int(ds.Columns)
        orientation = _floats(ds, "ImageOrientationPatient", 6, path)
        position = _floats(ds, "ImagePositionPatient", 3, path)
        spacing = _floats(ds, "PixelSpacing", 2, path)
        found_modality = str(ds.get("Modality", ""))
        if modality is not None and found_modality != modality:
            raise SeriesError(
                f"{path.name}: expected Modality {modality}, found {found_modality or '(none)'}"
            )
        if first is None:
            first = (rows, columns, orientation, spacing, found_modality)
        else:
            if (rows, columns) != first[:2]:
                raise SeriesError(
                    f"series {series_instance_uid}: mixed sizes: expected {first[0]}×{first[1]} "
                    f"like the first slice, found {rows}×{columns} in {path.name}"
                )
            if max(abs(a - b) for a, b in zip(orientation, first[2], strict=True)) > (
                ORIENTATION_TOLERANCE
            ):
                raise SeriesError(
                    f"series {series_instance_uid}: inconsistent geometry: expected "
                    f"ImageOrientationPatient {first[2]} like the first slice, found "
                    f"{orientation} in {path.name}"
                )
        number = ds.get("InstanceNumber")
        try:
            slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
            intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        except (TypeError, ValueError) as exc:
            raise SeriesError(
                f"{path.name}: expected numeric RescaleSlope/RescaleIntercept, found "
                f"{ds.get('RescaleSlope')!r}/{ds.get('RescaleIntercept')!r}"
            ) from exc
        try:
            instance_number = int(number) if number not in (None, "") else None
        except (TypeError, ValueError):
            instance_number = None  # InstanceNumber does not order slices here
        headers.append(
            (
                position,
                SliceHeader(
                    path=path,
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    instance_number=instance_number,
                    position=0.0,
                    rescale_slope=slope,
                    rescale_intercept=intercept,
                    pixels=pixels,
                ),
            )
        )
    assert first is not None
    rows, columns, orientation, spacing, found_modality = first
    row = np.asarray(orientation[:3])
    column = np.asarray(orientation[3:])
    normal = np.cross(row, column)
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise SeriesError(
            f"series {series_instance_uid}: inconsistent geometry: expected orthogonal unit "
            f"row and column cosines in ImageOrientationPatient, found {orientation}"
        )
    normal = normal / norm
    if normal[int(np.argmax(np.abs(normal)))] < 0:
        normal = -normal
    placed = sorted(
        (
            SliceHeader(
                h.path,
                h.sop_instance_uid,
                h.instance_number,
                float(np.dot(pos, normal)),
                h.rescale_slope,
                h.rescale_intercept,
                h.pixels,
            )
            for pos, h in headers
        ),
        key=lambda h: h.position,
    )
    for a, b in itertools.pairwise(placed):
        if abs(b.position - a.position) < 1e-4:
            raise SeriesError(
                f"series {series_instance_uid}: inconsistent geometry: expected one slice per "
                f"position along the normal, found {a.path.name} and {b.path.name} both at "
                f"{a.position:.3f} mm"
            )
    return Series(
        series_instance_uid=series_instance_uid,
        modality=found_modality,
        rows=rows,
        columns=columns,
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        slices=tuple(placed),
    )


@dataclass
class StageClock:
    """Seconds per stage; worker threads add to it (summed thread time, overlapping)."""

    seconds: dict[str, float]

    def add(self, stage: str, started: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def prefetch(items: Iterable[T], work: Callable[[T], R], threads: int, ahead: int) -> Iterator[R]:
    """``work(item)`` for each item, in order, computed by ``threads`` workers at most
    ``ahead`` items ahead of the consumer: decoding and preprocessing overlap compute."""
    iterator = iter(items)
    if threads <= 0:
        for item in iterator:
            yield work(item)
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sijnode-decode") as pool:
        pending: list[Future[R]] = []
        for item in iterator:
            pending.append(pool.submit(work, item))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            future = pending.pop(0)
            nxt = next(iterator, _END)
            if nxt is not _END:
                pending.append(pool.submit(work, nxt))  # type: ignore[arg-type]
            yield future.result()


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
