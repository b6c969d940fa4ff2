"""DICOMweb STOW-RS destination (PS3.18 10.5) with dicomweb-client.

All objects go in one multipart request, SR as Comprehensive SR (STOW-RS has no
negotiation). A 2xx response acknowledges the instances in its Referenced SOP Sequence
(all of them when the body lists none); failed instances and HTTP statuses are classified
like C-STORE statuses: 408, 429 and 5xx are transient, other 4xx permanent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from sijnode.delivery.objects import OutgoingObject
from sijnode.delivery.outcome import (
    AttemptResult,
    Outcome,
    classify_dimse_status,
    classify_http_status,
)
from sijnode.logs import fields
from sijnode.settings import DestinationSettings

log = logging.getLogger(__name__)


def _acknowledged(response: Dataset | None, sent: Sequence[str]) -> tuple[list[str], list[str]]:
    if response is None or "ReferencedSOPSequence" not in response:
        failed = [] if response is None else _failed(response)
        return [uid for uid in sent if uid not in failed], failed
    ok = [str(item.ReferencedSOPInstanceUID) for item in response.ReferencedSOPSequence]
    return ok, _failed(response)


def _failed(response: Dataset) -> list[str]:
    return [str(item.ReferencedSOPInstanceUID) for item in response.get("FailedSOPSequence", [])]


def send_stow(
    dest: DestinationSettings,
    objects: Sequence[OutgoingObject],
    *,
    already_acknowledged: Iterable[str] = (),
) -> AttemptResult:
    """POST the objects not yet acknowledged to ``{url}/studies``; classify the answer."""
    skip = set(already_acknowledged)
    todo = [o for o in objects if o.sop_instance_uid not in skip]
    result = AttemptResult(Outcome.DELIVERED)
    if not todo:
        return result
    datasets = []
    for obj in todo:
        result.sop_classes[obj.sop_instance_uid] = obj.sop_class_uids[0]
        datasets.append(obj.build(obj.sop_class_uids[0]))
    client = DICOMwebClient(dest.url, timeout=dest.timeout_seconds)
    sent = [o.sop_instance_uid for o in todo]
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        result.outcome = classify_http_status(code) if code else Outcome.TRANSIENT
        if result.outcome is Outcome.DELIVERED:  # raise_for_status does not raise on 2xx
            result.outcome = Outcome.TRANSIENT
        result.status = code or None
        result.error = f"STOW-RS to {dest.url} answered HTTP {code}"
        return result
    except (requests.ConnectionError, requests.Timeout) as exc:
        result.outcome = Outcome.TRANSIENT
        result.error = f"STOW-RS to {dest.url} failed: {type(exc).__name__}"
        return result
    ok, failed = _acknowledged(response, sent)
    result.acknowledged = [uid for uid in ok if uid in sent]
    if failed:
        reasons = [
            item.get("FailureReason")
            for item in (response.get("FailedSOPSequence", []) if response is not None else [])
        ]
        verdicts = {classify_dimse_status(int(r)) for r in reasons if r is not None}
        result.outcome = Outcome.TRANSIENT if Outcome.TRANSIENT in verdicts else Outcome.PERMANENT
        result.error = f"STOW-RS to {dest.url}: instances failed: {failed} (reasons {reasons})"
    elif set(result.acknowledged) != set(sent):
        result.outcome = Outcome.TRANSIENT
        result.error = (
            f"STOW-RS to {dest.url} acknowledged {len(result.acknowledged)} of {len(sent)}"
        )
    log.info(
        "stow-rs attempt",
        extra=fields(destination=dest.name, outcome=result.outcome.value, acknowledged=len(ok)),
    )
    return result
