"""Destinations behind one protocol (the model: mercure's target handlers).

A :class:`Plan` is what the scheduler read from the audit for one attempt; a
:class:`Target` turns it into an :class:`~sijnode.delivery.outcome.AttemptResult`
without touching the database (network I/O happens outside any transaction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sijnode.delivery.objects import OutgoingObject, from_file
from sijnode.delivery.outcome import AttemptResult, Outcome
from sijnode.delivery.scu import send_dicom
from sijnode.delivery.stow import send_stow
from sijnode.delivery.webhook import post_notification
from sijnode.errors import DeliveryError
from sijnode.settings import DestinationSettings, WebhookSettings

#: Kinds of delivery (``deliveries.kind``).
KIND_DICOM = "dicom"
KIND_STOW = "stow"
KIND_WEBHOOK = "webhook"
#: The destination name of the triage notification.
WEBHOOK_DESTINATION = "webhook"

ObjectLoader = Callable[[Path], OutgoingObject]


@dataclass
class Plan:
    """One attempt of one delivery, as read from the audit."""

    delivery_id: int
    job_id: int
    destination: str
    kind: str
    attempt: int
    output_paths: list[Path] = field(default_factory=list)
    already_acknowledged: list[str] = field(default_factory=list)
    commitment_transaction_uid: str | None = None
    body: dict[str, Any] = field(default_factory=dict)


class Target(Protocol):
    """A destination: sends one plan and says how it went."""

    kind: str

    def send(self, plan: Plan) -> AttemptResult:
        """Send what ``plan`` names; never raise for a network or peer failure."""


def _load(plan: Plan, loader: ObjectLoader) -> list[OutgoingObject] | AttemptResult:
    if not plan.output_paths:
        return AttemptResult(
            Outcome.PERMANENT, error=f"job {plan.job_id} has no recorded outputs to send"
        )
    try:
        return [loader(path) for path in plan.output_paths]
    except DeliveryError as exc:
        return AttemptResult(Outcome.PERMANENT, error=str(exc))


@dataclass
class DicomTarget:
    """C-STORE (and Storage Commitment where the destination has it)."""

    destination: DestinationSettings
    calling_ae_title: str
    loader: ObjectLoader = from_file
    kind: str = KIND_DICOM

    def send(self, plan: Plan) -> AttemptResult:
        """One association: every object not yet acknowledged, then N-ACTION."""
        objects = _load(plan, self.loader)
        if isinstance(objects, AttemptResult):
            return objects
        return send_dicom(
            self.destination,
            self.calling_ae_title,
            objects,
            already_acknowledged=plan.already_acknowledged,
            commitment_transaction_uid=(
                plan.commitment_transaction_uid if self.destination.storage_commitment else None
            ),
        )


@dataclass
class StowTarget:
    """DICOMweb STOW-RS."""

    destination: DestinationSettings
    loader: ObjectLoader = from_file
    kind: str = KIND_STOW

    def send(self, plan: Plan) -> AttemptResult:
        """One multipart POST of the objects not yet acknowledged."""
        objects = _load(plan, self.loader)
        if isinstance(objects, AttemptResult):
            return objects
        return send_stow(self.destination, objects, already_acknowledged=plan.already_acknowledged)


@dataclass
class WebhookTarget:
    """The triage notification."""

    settings: WebhookSettings
    kind: str = KIND_WEBHOOK

    def send(self, plan: Plan) -> AttemptResult:
        """POST the body the scheduler built."""
        if not self.settings.url:
            return AttemptResult(Outcome.PERMANENT, error="delivery.webhook.url is empty")
        return post_notification(self.settings, plan.body)
