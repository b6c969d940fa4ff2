"""Grad-CAM secondary captures: one RGB SC image per explained slice (PS3.3 A.8.1).

Each capture is the source slice windowed to 8 bits, the Grad-CAM heatmap blended in
colour where it is at least ``gradcam.threshold`` (opacity ``gradcam.alpha``), the box
around the peak, and a burned-in banner: research use, not for diagnosis, the probability
and the model version, and no patient identifier. Built with highdicom's
``SCImage.from_ref_dataset``; the attributes it does not set are fixed after
construction, as DICOM-OUTPUTS.md lists (BurnedInAnnotation, ConversionType WSD,
SourceImageSequence, DerivationDescription, ImageLaterality). The capture keeps the
source's grid and InstanceNumber, so viewers scroll it beside its slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from sijnode import __version__
from sijnode.errors import ReportError
from sijnode.models.result import Explanation, PipelineResult, Region
from sijnode.reports.codes import finding_codes

SC_SERIES_DESCRIPTION = "AI Grad-CAM heatmaps (research use)"
MANUFACTURER = "sijnode"
BANNER_TITLE = "AI OUTPUT - RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"

#: Dominant axis of a direction cosine → patient orientation letter (PS3.3 C.7.6.1.1.1).
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


@dataclass(frozen=True)
class Rendering:
    """How captures are drawn (from ``pipelines.<name>.gradcam``)."""

    threshold: float = 0.3
    alpha: float = 0.4


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Row and column direction letters from ImageOrientationPatient (dominant axis)."""
    try:
        iop = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError) as exc:
        raise ReportError(
            "expected ImageOrientationPatient with 6 values on the source slice, "
            f"got {ds.get('ImageOrientationPatient')!r}"
        ) from exc
    if len(iop) != 6:
        raise ReportError(f"expected 6 ImageOrientationPatient values, got {len(iop)}")

    def letter(vector: list[float]) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return _AXIS_LETTERS[axis][0 if vector[axis] > 0 else 1]

    return letter(iop[:3]), letter(iop[3:])


def _first(value: object) -> float:
    """The first value of a possibly multi-valued DS (WindowCenter, WindowWidth)."""
    if isinstance(value, MultiValue | list | tuple):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def windowed(ds: Dataset) -> npt.NDArray[np.uint8]:
    """The slice as 8-bit grey: modality LUT, then the first VOI window of the header.

    Without a window in the header the 1st-99th percentile range is used. MONOCHROME1
    is inverted so that bright means high signal, as on a MONOCHROME2 display.
    """
    try:
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    except (AttributeError, ValueError, TypeError) as exc:
        raise ReportError(f"expected decodable source pixels, got {exc}") from exc
    if values.ndim != 2:
        raise ReportError(f"expected a single-frame greyscale slice, got shape {values.shape}")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = _first(center), _first(width)
        low, high = c - w / 2, c + w / 2
    else:
        low, high = (float(v) for v in np.percentile(values, (1, 99)))
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, 1) * 255
    grey = np.rint(scaled).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        grey = 255 - grey
    return grey


def blend(
    grey: npt.NDArray[np.uint8], heatmap: npt.NDArray[np.uint8], rendering: Rendering
) -> npt.NDArray[np.uint8]:
    """RGB: the JET colour map of ``heatmap`` over ``grey`` where heatmap ≥ threshold."""
    if heatmap.shape != grey.shape or heatmap.dtype != np.uint8:
        raise ReportError(
            f"expected a uint8 heatmap of the slice's shape {grey.shape}, "
            f"got {heatmap.dtype} {heatmap.shape}"
        )
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    colour = cv2.cvtColor(cv2.applyColorMap(heatmap, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    mask = heatmap >= np.uint8(round(rendering.threshold * 255))
    mixed = (1 - rendering.alpha) * rgb[mask] + rendering.alpha * colour[mask]
    rgb[mask] = np.rint(mixed).astype(np.uint8)
    return rgb


def draw_region(rgb: npt.NDArray[np.uint8], region: Region) -> None:
    """The peak box in white, as the SR's POLYLINE (in place)."""
    thickness = max(1, rgb.shape[1] // 256)
    cv2.rectangle(
        rgb,
        (round(region.column0), round(region.row0)),
        (max(round(region.column1) - 1, 0), max(round(region.row1) - 1, 0)),
        (255, 255, 255),
        thickness,
    )


def burn_banner(rgb: npt.NDArray[np.uint8], lines: list[str]) -> None:
    """A dark band at the top with ``lines`` in white Hershey text (in place, no fonts).

    The text is scaled so that the longest line fits the width of the image.
    """
    columns = rgb.shape[1]
    font, margin = cv2.FONT_HERSHEY_SIMPLEX, max(2, columns // 100)
    thickness = max(1, round(columns / 512))
    widest = max(cv2.getTextSize(text, font, 1.0, thickness)[0][0] for text in lines)
    scale = min(columns / 1100, (columns - 2 * margin) / max(widest, 1))
    line_height = max(8, round(30 * scale))
    band = line_height * len(lines) + line_height // 2
    rgb[:band] = (rgb[:band] * 0.25).astype(np.uint8)
    for i, text in enumerate(lines, start=1):
        cv2.putText(
            rgb,
            text,
            (margin, i * line_height),
            font,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )


def banner_lines(result: PipelineResult, explanation: Explanation) -> list[str]:
    """Banner text: research-use warning, probabilities and model version; no identifiers."""
    label = finding_codes(result.finding).label
    return [
        BANNER_TITLE,
        f"{label}: {result.decision.value}",
        f"P(study) = {result.probability:.3f}, P(image) = {explanation.score:.3f}",
        f"model {result.algorithm.name} {result.algorithm.version}",
    ]


def render_capture(
    source: Dataset, result: PipelineResult, explanation: Explanation, rendering: Rendering
) -> npt.NDArray[np.uint8]:
    """The RGB pixels of one capture."""
    rgb = blend(windowed(source), explanation.heatmap, rendering)
    draw_region(rgb, explanation.peak_region)
    burn_banner(rgb, banner_lines(result, explanation))
    return rgb


def build_capture(
    source: Dataset,
    result: PipelineResult,
    explanation: Explanation,
    rendering: Rendering,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    jpegls: bool = False,
    institution_name: str = "",
) -> hd.sc.SCImage:
    """One Grad-CAM secondary capture of ``source`` (which must hold its pixels)."""
    if str(source.SOPInstanceUID) != explanation.sop_instance_uid:
        raise ReportError(
            f"expected the source slice {explanation.sop_instance_uid}, got {source.SOPInstanceUID}"
        )
    pixels = render_capture(source, result, explanation, rendering)
    spacing = source.get("PixelSpacing")
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=int(source.get("InstanceNumber") or explanation.position_index + 1),
            manufacturer=MANUFACTURER,
            # highdicom 0.28.2 annotates tuple[int, int]; PixelSpacing is DS (float) in PS3.3.
            pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing else None,  # type: ignore[arg-type]
            patient_orientation=patient_orientation(source),
            transfer_syntax_uid=JPEGLSLossless if jpegls else ExplicitVRLittleEndian,
            series_description=SC_SERIES_DESCRIPTION,
            software_versions=f"sijnode {__version__}",
            institution_name=institution_name or None,
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"highdicom rejected the secondary capture: {exc}") from exc
    # DICOM-OUTPUTS.md: what SCImage does not set, or sets otherwise.
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    sc.DerivationDescription = (
        f"Grad-CAM of {result.algorithm.name} {result.algorithm.version} blended over the "
        f"windowed source (threshold {rendering.threshold}, alpha {rendering.alpha})"
    )[:1024]
    # The slice shows both sacroiliac joints (PS3.3 C.7.6.2: ImageLaterality B).
    sc.ImageLaterality = "B"
    return sc
