"""The TID 1500 Measurement Report of one job (PS3.16 TID 1500, 1501, 1410, 4019).

One report per job, built with highdicom. The content tree is built once
(:func:`build_measurement_report`) and can be encoded under any of the three SR classes
that hold it (:func:`encode_sr`): Comprehensive SR (88.33, the default), Enhanced SR
(88.22) or Comprehensive 3D SR (88.34), so the sender chooses the class after association
negotiation. Layout (DICOM-OUTPUTS.md):

1. the decision group (TID 1501): tracking identifier and UID, the post-coordinated
   finding, the algorithm (TID 4019), finding site(s) with laterality, NUM Probability
   (UCUM ``1``) and the qualitative evaluation Present/Absent/Indeterminate;
2. one planar-ROI group (TID 1410) per explained slice, with a closed POLYLINE around the
   Grad-CAM peak, so that OHIF draws it.

The document goes into a new series of the original study, with the patient and study
modules copied from the source headers (the evidence), PRELIMINARY and UNVERIFIED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage

from sijnode import __version__
from sijnode.errors import ReportError
from sijnode.models.result import AlgorithmIdentity, Decision, Explanation, PipelineResult
from sijnode.reports import codes
from sijnode.reports.uids import JobUIDs, device_uid

#: SeriesDescription of the SR series (DICOM-OUTPUTS.md: plain, says AI and research use).
SR_SERIES_DESCRIPTION = "AI sacroiliitis result (research use)"
MANUFACTURER = "sijnode"

#: SR Storage SOP Class UID → the highdicom class that writes it.
SR_CLASSES: dict[str, type[hd.sr.ComprehensiveSR | hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR]] = {
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
}


@dataclass(frozen=True)
class SRContent:
    """Everything an SR needs except its SOP class: build once, encode per destination."""

    report: hd.sr.MeasurementReport
    #: Source headers first (patient/study modules are copied from the first), then captures.
    evidence: tuple[Dataset, ...]
    uids: JobUIDs
    series_number: int
    predecessors: tuple[Dataset, ...] = ()
    institution_name: str = ""


def probability_value(value: float) -> float:
    """A probability rounded to 6 decimals, so the DS written (≤ 16 chars) equals the value."""
    return round(float(value), 6)


def algorithm_identification(
    result: PipelineResult, full: bool = True
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 from the model spec: name, version, manufacturer, family and parameters.

    The parameters include both operating thresholds and the aggregation rule, so a
    report traces to exact weights and the operating point it was read at. The region
    groups repeat only the name and version (``full=False``; the rest is the decision
    group's), which keeps a 300-slice report with 8 regions under 58 KiB.
    """
    algorithm: AlgorithmIdentity = result.algorithm
    if not full:
        return hd.sr.AlgorithmIdentification(name=algorithm.name, version=algorithm.version)
    parameters: dict[str, Any] = {
        **algorithm.parameters,
        "threshold": result.threshold,
        "slice_threshold": result.slice_threshold,
        "aggregation": result.aggregation,
        **{f"aggregation.{k}": v for k, v in result.aggregation_parameters.items()},
    }
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[f"{key}={value}" for key, value in sorted(parameters.items())],
        family=codes.ALGORITHM_FAMILY,
        manufacturer=algorithm.manufacturer,
    )


def finding_sites(
    result_finding: codes.PostCoordinatedFinding, laterality: str | None
) -> list[hd.sr.FindingSite]:
    """The finding's anatomic sites; the laterality goes with each site where known."""
    side = codes.laterality_code(laterality)
    return [
        hd.sr.FindingSite(anatomic_location=site, laterality=side) for site in result_finding.sites
    ]


def _by_uid(headers: Sequence[Dataset]) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in headers}


def _slice_positive(result: PipelineResult, explanation: Explanation) -> bool:
    for s in result.slices:
        if s.sop_instance_uid == explanation.sop_instance_uid:
            return s.positive
    return explanation.score >= result.slice_threshold


def observation_context(uids: JobUIDs, device_name: str) -> hd.sr.ObservationContext:
    """TID 1002 with this node as the device observer (TID 1004), no person observer."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(uids.uid_root, device_name),
        name=device_name,
        manufacturer_name=MANUFACTURER,
        model_name="sijnode",
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.OBSERVER_DEVICE, observer_identifying_attributes=device
        )
    )


def build_measurement_report(
    result: PipelineResult,
    source_headers: Sequence[Dataset],
    uids: JobUIDs,
    device_name: str,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree: the decision group first, then one region group per slice."""
    if not source_headers:
        raise ReportError("expected the source headers of the job's images, got none")
    studies = {str(ds.StudyInstanceUID) for ds in source_headers}
    if studies != {result.study_instance_uid}:
        raise ReportError(
            f"expected source images of study {result.study_instance_uid} only, "
            f"got {len(studies)} studies"
        )
    modality = str(source_headers[0].Modality)
    finding = codes.finding_codes(result.finding)
    algorithm = algorithm_identification(result)
    region_algorithm = algorithm_identification(result, full=False)
    headers = _by_uid(source_headers)

    explained_sources = []
    for explanation in result.explanations:
        header = headers.get(explanation.sop_instance_uid)
        if header is None:
            raise ReportError(
                f"expected the explained slice {explanation.sop_instance_uid} among the "
                f"{len(headers)} source images, it is missing"
            )
        explained_sources.append(header)

    decision = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking(0), identifier=f"AI {finding.label}: study decision"
        ),
        finding_type=finding.finding_type,
        algorithm_id=algorithm,
        finding_sites=finding_sites(finding, result.laterality),
        measurements=[
            hd.sr.Measurement(
                name=codes.PROBABILITY,
                value=probability_value(result.probability),
                unit=codes.NO_UNITS,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=finding.finding_type, value=codes.DECISION[Decision(result.decision)]
            )
        ],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in explained_sources
        ]
        or None,
    )
    groups: list[Any] = [decision]
    for index, (explanation, header) in enumerate(
        zip(result.explanations, explained_sources, strict=True), start=1
    ):
        present = _slice_positive(result, explanation)
        region = hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(explanation.peak_region.polyline(), dtype=float),
            source_image=hd.sr.SourceImageForRegion.from_source_image(header),
        )
        number = explanation.instance_number or header.get("InstanceNumber")
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.tracking(index), identifier=f"Grad-CAM peak, image {number}"
                ),
                referenced_region=region,
                finding_type=finding.finding_type,
                algorithm_id=region_algorithm,
                finding_sites=finding_sites(finding, explanation.laterality),
                measurements=[
                    hd.sr.Measurement(
                        name=codes.PROBABILITY,
                        value=probability_value(explanation.score),
                        unit=codes.NO_UNITS,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=finding.finding_type,
                        value=codes.DECISION[Decision.PRESENT if present else Decision.ABSENT],
                    )
                ],
            )
        )
    return hd.sr.MeasurementReport(
        observation_context=observation_context(uids, device_name),
        procedure_reported=codes.procedure_code(modality),
        imaging_measurements=groups,
    )


def encode_sr(
    content: SRContent, sop_class_uid: str
) -> hd.sr.ComprehensiveSR | hd.sr.EnhancedSR | hd.sr.Comprehensive3DSR:
    """The SR document of ``content`` as SOP class ``sop_class_uid`` (88.33, 88.22 or 88.34)."""
    try:
        cls = SR_CLASSES[sop_class_uid]
    except KeyError as exc:
        raise ReportError(
            f"expected an SR SOP class out of {', '.join(SR_CLASSES)}, got {sop_class_uid!r}"
        ) from exc
    extra: dict[str, Any] = {}
    if content.institution_name:
        extra["institution_name"] = content.institution_name
    try:
        sr = cls(
            evidence=list(content.evidence),
            content=content.report[0],
            series_instance_uid=content.uids.sr_series,
            series_number=content.series_number,
            sop_instance_uid=content.uids.sr(sop_class_uid),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            previous_versions=list(content.predecessors) or None,
            series_description=SR_SERIES_DESCRIPTION,
            software_versions=f"sijnode {__version__}",
            **extra,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise ReportError(f"highdicom rejected the SR content as {cls.__name__}: {exc}") from exc
    return sr


def predecessor_reference(
    study_instance_uid: str, series_instance_uid: str, sop_class_uid: str, sop_instance_uid: str
) -> Dataset:
    """A minimal header of an earlier SR, enough for the Predecessor Documents Sequence."""
    ds = Dataset()
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    return ds
