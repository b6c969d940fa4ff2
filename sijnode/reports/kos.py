"""Optional Key Object Selection document (PS3.3 A.35.4, PS3.16 TID 2010).

Lists the explained source slices and their Grad-CAM captures under the title
"Of Interest" (CID 7010) with a one-line summary, which most PACS show as key images.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from sijnode import __version__
from sijnode.errors import ReportError
from sijnode.models.result import PipelineResult
from sijnode.reports import codes
from sijnode.reports.uids import device_uid

KO_SERIES_DESCRIPTION = "AI key images (research use)"
MANUFACTURER = "sijnode"


def summary_text(result: PipelineResult) -> str:
    """One line: the finding, the decision, the probability, the model; no identifiers."""
    label = codes.finding_codes(result.finding).label
    reason = f" ({result.reason})" if result.reason else ""
    return (
        f"AI {label}: {result.decision.value.upper()}{reason}, probability "
        f"{result.probability:.3f} ({result.algorithm.name} {result.algorithm.version}); "
        "research use, not for diagnosis"
    )


def build_kos(
    result: PipelineResult,
    key_objects: Sequence[Dataset],
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    uid_root: str,
    device_name: str,
    institution_name: str = "",
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of ``key_objects`` (source headers first: patient and study come from them)."""
    if not key_objects:
        raise ReportError("expected at least one key image for the KOS, got none")
    observer = hd.sr.ObserverContext(
        observer_type=codes.OBSERVER_DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(uid_root, device_name),
            name=device_name,
            manufacturer_name=MANUFACTURER,
            model_name="sijnode",
        ),
    )
    content = hd.ko.KeyObjectSelection(
        document_title=codes.KEY_OBJECT_TITLE,
        referenced_objects=list(key_objects),
        observer_device_context=observer,
        description=summary_text(result),
    )
    try:
        return hd.ko.KeyObjectSelectionDocument(
            evidence=list(key_objects),
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=KO_SERIES_DESCRIPTION,
            software_versions=f"sijnode {__version__}",
            institution_name=institution_name or None,
        )
    except (ValueError, TypeError) as exc:
        raise ReportError(f"highdicom rejected the key object selection: {exc}") from exc
