"""Storage Commitment, push model (PS3.4 Annex J): N-ACTION asks the peer to commit the
stored objects; the peer answers with N-EVENT-REPORT, on the same association or on a new
one it opens to this node's AE title (Orthanc does the latter).

:func:`request_commitment` sends the N-ACTION. :class:`CommitmentReportHandler` is the
``EVT_N_EVENT_REPORT`` handler: bind it to any AE (the node's listener, or the small
:class:`CommitmentListener`), and it hands each result to a callback that records it.
A delivery counts as committed only when the report lists every object it sent.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)
from sqlalchemy.exc import SQLAlchemyError

from sijnode.delivery.outcome import AttemptResult, Outcome, classify_dimse_status
from sijnode.errors import SijnodeError
from sijnode.logs import fields

log = logging.getLogger(__name__)

#: PS3.4 J.3.2: Action Type ID 1, Request Storage Commitment.
ACTION_REQUEST_COMMITMENT = 1
#: PS3.4 J.3.3: Event Type ID 1 (all committed) and 2 (failures exist).
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2
#: PS3.7 C.4.1: Processing failure, so the peer sends the report again later.
STATUS_PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class CommitmentReport:
    """The content of one N-EVENT-REPORT (PS3.4 Table J.3-2)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int | None], ...]
    #: Who sent it: the requestor of the association that carried it (for the audit).
    calling_ae_title: str = ""
    peer_address: str = ""


#: Records a report; returns False when it names no transaction this node awaits (it
#: records that too, as a ``commitment_unknown`` event).
ReportCallback = Callable[[CommitmentReport], bool]


def commitment_request(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and Referenced SOP Sequence."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def request_commitment(
    assoc: Association, transaction_uid: str, refs: Sequence[tuple[str, str]]
) -> AttemptResult:
    """Send N-ACTION on ``assoc``: COMMITTING on success, else the classified failure."""
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    if str(StorageCommitmentPushModel) not in accepted:
        return AttemptResult(
            Outcome.PERMANENT,
            error=(
                "the peer stored the objects but did not accept Storage Commitment Push Model "
                "(1.2.840.10008.1.20.1); set storage_commitment = false for this destination"
            ),
        )
    status, _reply = assoc.send_n_action(
        commitment_request(transaction_uid, refs),
        ACTION_REQUEST_COMMITMENT,
        StorageCommitmentPushModel,
        StorageCommitmentPushModelInstance,
    )
    if not status or "Status" not in status:
        return AttemptResult(
            Outcome.TRANSIENT, error="no N-ACTION response (DIMSE timeout or aborted)"
        )
    code = int(status.Status)
    verdict = classify_dimse_status(code)
    if verdict is Outcome.DELIVERED:
        return AttemptResult(Outcome.COMMITTING, commitment_transaction_uid=transaction_uid)
    return AttemptResult(
        verdict, status=code, error=f"Storage Commitment N-ACTION failed with 0x{code:04X}"
    )


def parse_report(ds: Dataset) -> CommitmentReport:
    """Read Transaction UID, Referenced SOP Sequence and Failed SOP Sequence."""
    committed = tuple(
        str(item.ReferencedSOPInstanceUID) for item in ds.get("ReferencedSOPSequence", [])
    )
    failed = tuple(
        (str(item.ReferencedSOPInstanceUID), item.get("FailureReason"))
        for item in ds.get("FailedSOPSequence", [])
    )
    return CommitmentReport(str(ds.get("TransactionUID", "")), committed, failed)


class CommitmentReportHandler:
    """``EVT_N_EVENT_REPORT`` handler for Storage Commitment results."""

    def __init__(self, on_report: ReportCallback) -> None:
        self.on_report = on_report

    def __call__(self, event: Event) -> tuple[int, Dataset | None]:
        """Record the report; answer Success, or Processing failure to have it resent."""
        request: Any = event.request
        if str(request.AffectedSOPClassUID) != str(StorageCommitmentPushModel):
            return 0x0112, None  # No such SOP instance: not a commitment report
        if request.EventTypeID not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
            return 0x0113, None  # No such event type
        report = parse_report(event.event_information)
        requestor = event.assoc.requestor
        report = dataclasses.replace(
            report,
            calling_ae_title=str(requestor.ae_title or "").strip(),
            peer_address=str(requestor.address or ""),
        )
        try:
            known = self.on_report(report)
        except (SijnodeError, SQLAlchemyError):  # not recorded: the peer sends it again
            log.exception("storage commitment report could not be recorded")
            return STATUS_PROCESSING_FAILURE, None
        log.info(
            "storage commitment report",
            extra=fields(
                transaction_uid=report.transaction_uid,
                committed=len(report.committed),
                failed=len(report.failed),
                known=known,
            ),
        )
        return (0x0000 if known else STATUS_PROCESSING_FAILURE), None

    def handlers(self) -> list[Any]:
        """The ``evt_handlers`` entry to pass to ``start_server`` or ``associate``."""
        return [(evt.EVT_N_EVENT_REPORT, self)]

    @staticmethod
    def add_context(ae: AE) -> None:
        """Accept Storage Commitment Push Model with either role: the peer sends the report
        as the SCP of the class, as the requestor of the association (PS3.4 J.3.3)."""
        ae.add_supported_context(
            StorageCommitmentPushModel,
            [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)],
            scu_role=True,
            scp_role=True,
        )


class CommitmentListener:
    """A small SCP that only takes Storage Commitment reports, for a dedicated port
    (``delivery.commitment_port``) when the node's listener does not take them."""

    def __init__(
        self,
        ae_title: str,
        bind_address: str,
        port: int,
        on_report: ReportCallback,
        allowed_calling_ae_titles: Sequence[str] = (),
    ) -> None:
        self.ae = AE(ae_title=ae_title)
        if allowed_calling_ae_titles:  # only the destinations asked for commitment report
            self.ae.require_calling_aet = list(allowed_calling_ae_titles)
        CommitmentReportHandler.add_context(self.ae)
        self.handler = CommitmentReportHandler(on_report)
        self.address = (bind_address, port)
        self._server: object | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        server = self._server
        if server is None:
            return self.address[1]
        return int(server.server_address[1])  # type: ignore[attr-defined]

    def start(self) -> None:
        """Listen in a background thread."""
        with self._lock:
            if self._server is None:
                self._server = self.ae.start_server(
                    self.address, block=False, evt_handlers=self.handler.handlers()
                )

    def stop(self) -> None:
        """Stop listening."""
        with self._lock:
            if self._server is not None:
                self._server.shutdown()  # type: ignore[attr-defined]
                self._server = None
