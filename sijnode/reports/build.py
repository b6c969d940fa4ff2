"""All DICOM outputs of one job: the SR, the Grad-CAM captures and the optional KOS.

:func:`build_outputs` reads the source headers (``stop_before_pixels``) as evidence and
the pixels of the explained slices only, then builds, in this order, the captures (the SR
references them), the SR content once, the SR in the first class of
``reports.sr_sop_classes``, and the KOS when ``reports.kos`` is on. Every UID comes from
the job key (``reports/uids.py``), so building again gives the same objects. The
:class:`ReportBundle` re-encodes the SR under the class a destination accepted
(:meth:`ReportBundle.sr_as`) and the captures in the transfer syntax it accepted
(:meth:`ReportBundle.captures_in`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from sijnode.errors import ReportError
from sijnode.logs import fields
from sijnode.models.result import PipelineResult
from sijnode.reports.kos import build_kos
from sijnode.reports.sc import Rendering, build_capture
from sijnode.reports.sr import (
    SR_CLASSES,
    SRContent,
    build_measurement_report,
    encode_sr,
    predecessor_reference,
)
from sijnode.reports.uids import JobUIDs
from sijnode.settings import GradCAMSettings, Settings

log = logging.getLogger(__name__)

#: File name stems of the written objects: ``<dir>/<role>-<n>.dcm``.
ROLE_SR, ROLE_SC, ROLE_KO = "sr", "sc", "ko"


@dataclass
class ReportBundle:
    """The outputs of one job; :attr:`sr` is in the preferred SR class."""

    content: SRContent
    sr: Dataset
    captures: tuple[hd.sc.SCImage, ...]
    kos: hd.ko.KeyObjectSelectionDocument | None
    #: Seconds per step: read, captures, sr, kos.
    seconds: dict[str, float] = field(default_factory=dict)
    _encoded: dict[str, Dataset] = field(default_factory=dict, repr=False)

    def sr_as(self, sop_class_uid: str) -> Dataset:
        """The same SR content as SOP class ``sop_class_uid`` (chosen after negotiation)."""
        if sop_class_uid == self.sr.SOPClassUID:
            return self.sr
        if sop_class_uid not in self._encoded:
            self._encoded[sop_class_uid] = encode_sr(self.content, sop_class_uid)
        return self._encoded[sop_class_uid]

    def captures_in(self, transfer_syntax_uid: str) -> list[Dataset]:
        """The captures in ``transfer_syntax_uid``: Explicit VR Little Endian or JPEG-LS lossless.

        The SOP Instance UIDs stay the same: lossless re-encoding keeps the instance.
        """
        out: list[Dataset] = []
        for sc in self.captures:
            current = sc.file_meta.TransferSyntaxUID
            if current == transfer_syntax_uid:
                out.append(sc)
                continue
            ds = copy.deepcopy(sc)
            if transfer_syntax_uid == JPEGLSLossless and current == ExplicitVRLittleEndian:
                ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls", generate_instance_uid=False)
            elif transfer_syntax_uid == ExplicitVRLittleEndian and current == JPEGLSLossless:
                ds.decompress(generate_instance_uid=False)
            else:
                raise ReportError(
                    f"expected {ExplicitVRLittleEndian} or {JPEGLSLossless} for the captures, "
                    f"got {transfer_syntax_uid}"
                )
            out.append(ds)
        return out

    def datasets(self, sr_sop_class_uid: str | None = None) -> list[Dataset]:
        """SR first, then the captures, then the KOS."""
        sr = self.sr if sr_sop_class_uid is None else self.sr_as(sr_sop_class_uid)
        return [sr, *self.captures, *([self.kos] if self.kos is not None else [])]

    def write(self, directory: Path, sr_sop_class_uid: str | None = None) -> list[Path]:
        """Write ``<dir>/sr-1.dcm``, ``sc-<n>.dcm`` and ``ko-1.dcm`` (atomic renames)."""
        directory.mkdir(parents=True, exist_ok=True)
        sr = self.sr if sr_sop_class_uid is None else self.sr_as(sr_sop_class_uid)
        named: list[tuple[str, Dataset]] = [(f"{ROLE_SR}-1", sr)]
        named += [(f"{ROLE_SC}-{n}", sc) for n, sc in enumerate(self.captures, start=1)]
        if self.kos is not None:
            named.append((f"{ROLE_KO}-1", self.kos))
        paths = []
        for stem, ds in named:
            path = directory / f"{stem}.dcm"
            partial = path.with_suffix(".partial")
            ds.save_as(partial, enforce_file_format=True)
            os.replace(partial, path)
            paths.append(path)
        return paths


def read_headers(source_paths: Sequence[Path]) -> list[Dataset]:
    """Headers of the source images without pixels (enough as SR evidence)."""
    headers: list[Dataset] = []
    for path in source_paths:
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except (OSError, InvalidDicomError) as exc:
            raise ReportError(f"expected a readable DICOM source image at {path}: {exc}") from exc
    return headers


def build_outputs(
    result: PipelineResult,
    source_paths: Sequence[Path],
    job_key: str,
    settings: Settings,
    predecessor: Dataset | None = None,
) -> ReportBundle:
    """Build every output of one job from its result and its source images."""
    reports = settings.reports
    gradcam = (
        settings.pipelines[result.pipeline].gradcam
        if result.pipeline in settings.pipelines
        else GradCAMSettings()
    )
    uids = JobUIDs(settings.node.uid_root, job_key)
    device_name = settings.node.ae_title
    started = time.perf_counter()
    headers = read_headers(source_paths)
    path_of = {str(h.SOPInstanceUID): p for h, p in zip(headers, source_paths, strict=True)}
    seconds = {"read": time.perf_counter() - started}

    started = time.perf_counter()
    rendering = Rendering(threshold=gradcam.threshold, alpha=gradcam.alpha)
    captures: list[hd.sc.SCImage] = []
    explanations = result.explanations if gradcam.enabled else ()
    for index, explanation in enumerate(explanations, start=1):
        path = path_of.get(explanation.sop_instance_uid)
        if path is None:
            raise ReportError(
                f"expected the explained slice {explanation.sop_instance_uid} among the "
                f"{len(headers)} source images, it is missing"
            )
        source = pydicom.dcmread(path)
        captures.append(
            build_capture(
                source,
                result,
                explanation,
                rendering,
                series_instance_uid=uids.sc_series,
                series_number=reports.sc_series_number,
                sop_instance_uid=uids.sc(index),
                jpegls=reports.sc_jpegls,
                institution_name=reports.institution_name,
            )
        )
    seconds["captures"] = time.perf_counter() - started

    started = time.perf_counter()
    report = build_measurement_report(result, headers, uids, device_name)
    content = SRContent(
        report=report,
        evidence=(*headers, *captures),
        uids=uids,
        series_number=reports.sr_series_number,
        predecessors=(predecessor,) if predecessor is not None else (),
        institution_name=reports.institution_name,
    )
    sr = encode_sr(content, reports.sr_sop_classes[0])
    seconds["sr"] = time.perf_counter() - started

    started = time.perf_counter()
    kos = None
    if reports.kos and captures:
        by_uid = {str(h.SOPInstanceUID): h for h in headers}
        key_sources = [by_uid[e.sop_instance_uid] for e in explanations]
        kos = build_kos(
            result,
            [*key_sources, *captures],
            series_instance_uid=uids.ko_series,
            series_number=reports.kos_series_number,
            sop_instance_uid=uids.ko(),
            uid_root=settings.node.uid_root,
            device_name=device_name,
            institution_name=reports.institution_name,
        )
    seconds["kos"] = time.perf_counter() - started
    log.info(
        "report outputs built",
        extra=fields(
            study_instance_uid=result.study_instance_uid,
            pipeline=result.pipeline,
            decision=result.decision.value,
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            captures=len(captures),
            kos=kos is not None,
            superseding=predecessor is not None,
            seconds={k: round(v, 4) for k, v in seconds.items()},
        ),
    )
    return ReportBundle(content=content, sr=sr, captures=tuple(captures), kos=kos, seconds=seconds)


def reencode_sr(sr: Dataset, sop_class_uid: str, job_key: str, uid_root: str) -> Dataset:
    """An SR written by :func:`build_outputs` and read back, as another SR class.

    For a delivery retried after a restart, when only the written files are left: the
    content tree, the evidence references, the predecessors and the patient and study
    modules come from ``sr`` itself, the UIDs from the job key, so the result equals
    ``bundle.sr_as(sop_class_uid)`` of the original build.
    """
    if sr.get("SOPClassUID") not in SR_CLASSES:
        raise ReportError(
            f"expected an SR of class {', '.join(SR_CLASSES)}, got {sr.get('SOPClassUID')}"
        )
    uids = JobUIDs(uid_root, job_key)
    if sr.SeriesInstanceUID != uids.sr_series:
        raise ReportError(
            f"expected the SR series {uids.sr_series} of job key {job_key[:12]}..., "
            f"got {sr.SeriesInstanceUID}"
        )
    report = SR_CLASSES[sr.SOPClassUID].from_dataset(sr).content
    evidence: list[Dataset] = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for item in series.ReferencedSOPSequence:
                evidence.append(
                    predecessor_reference(
                        study.StudyInstanceUID,
                        series.SeriesInstanceUID,
                        item.ReferencedSOPClassUID,
                        item.ReferencedSOPInstanceUID,
                    )
                )
    if not evidence:
        raise ReportError("expected a Current Requested Procedure Evidence Sequence, got none")
    # highdicom copies the patient and study modules from the first evidence item
    first = copy.deepcopy(sr)
    for keyword in ("SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(first, keyword, evidence[0].get(keyword))
    evidence[0] = first
    predecessors = tuple(
        predecessor_reference(
            study.StudyInstanceUID,
            series.SeriesInstanceUID,
            item.ReferencedSOPClassUID,
            item.ReferencedSOPInstanceUID,
        )
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    )
    content = SRContent(
        report=report,
        evidence=tuple(evidence),
        uids=uids,
        series_number=int(sr.SeriesNumber),
        predecessors=predecessors,
        institution_name=str(sr.get("InstitutionName", "")),
    )
    return encode_sr(content, sop_class_uid)


def output_uids(job_key: str, uid_root: str) -> JobUIDs:
    """The UIDs a job's outputs get (for delivery records before anything is built)."""
    return JobUIDs(uid_root, job_key)


__all__ = ["ReportBundle", "build_outputs", "output_uids", "read_headers", "reencode_sr"]
