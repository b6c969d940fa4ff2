"""The C-STORE SCU: one association per delivery, stock pynetdicom (PS3.4 Annex B).

- TCP_NODELAY on the sending socket (measured on these machines: 18 -> about 80
  images/s; pynetdicom does not set it). It is set from an ``EVT_CONN_OPEN`` handler
  through public attributes only (``event.assoc.dul.socket.socket``), after ``connect``
  and before the A-ASSOCIATE-RQ is written: :func:`set_tcp_nodelay`.
- TLS from the destination's :class:`~sijnode.settings.TLSSettings` (PS3.15 B.1).
- Every object's SOP classes are proposed; each object goes in the first of its classes
  that the peer accepted (the SR: Comprehensive, Enhanced, Comprehensive 3D).
- Storage Commitment (PS3.4 J.3) is requested on the same association once every object
  is stored (:mod:`sijnode.delivery.commitment`).
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from sijnode.delivery.commitment import request_commitment
from sijnode.delivery.objects import OutgoingObject, choose_class, sop_classes_to_propose
from sijnode.delivery.outcome import AttemptResult, Outcome, classify_dimse_status
from sijnode.errors import DeliveryError
from sijnode.logs import fields
from sijnode.settings import DestinationSettings, TLSSettings

log = logging.getLogger(__name__)

_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
#: PS3.8 9.3.4: at most 128 presentation contexts in one A-ASSOCIATE-RQ.
MAX_CONTEXTS = 128


def set_tcp_nodelay(event: Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket."""
    wrapper = event.assoc.dul.socket
    sock = None if wrapper is None else wrapper.socket
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A TLS 1.2+ client context: verify the peer against ``ca_file`` (or the system CAs),
    present this node's certificate and key."""
    ctx = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca_file is None else str(tls.ca_file)
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return ctx


def _add_contexts(ae: AE, objects: Iterable[OutgoingObject], commitment: bool) -> None:
    count = 0
    for sop_class, syntaxes in sop_classes_to_propose(objects).items():
        compressed = sorted(ts for ts in syntaxes if ts not in _UNCOMPRESSED)
        for ts in compressed:
            ae.add_requested_context(sop_class, [ts])
            count += 1
        ae.add_requested_context(sop_class, list(_UNCOMPRESSED))
        count += 1
    if commitment:
        ae.add_requested_context(StorageCommitmentPushModel, list(_UNCOMPRESSED))
        count += 1
    if count > MAX_CONTEXTS:
        raise DeliveryError(
            f"expected at most {MAX_CONTEXTS} presentation contexts for one association, "
            f"the objects need {count}"
        )


def _not_established(
    assoc: Association, flags: set[str], dest: DestinationSettings
) -> AttemptResult:
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if "connected" not in flags:
        return AttemptResult(
            Outcome.TRANSIENT, error=f"could not connect to {where} (refused or timed out)"
        )
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = getattr(rsp, "result", 2)
        reason = f"{getattr(rsp, 'result_str', '')}: {getattr(rsp, 'reason_str', '')}"
        outcome = Outcome.PERMANENT if result == 0x01 else Outcome.TRANSIENT
        return AttemptResult(outcome, error=f"association rejected by {where} ({reason})")
    if "accepted" in flags:
        return AttemptResult(
            Outcome.PERMANENT,
            error=f"{where} accepted none of the proposed SOP classes (unsupported SOP class)",
        )
    return AttemptResult(Outcome.TRANSIENT, error=f"association with {where} aborted or timed out")


def _encoded_for(ds: Dataset, assoc: Association) -> Dataset:
    """``ds`` as is when the peer accepted its transfer syntax for its class; a compressed
    dataset the peer did not accept (e.g. JPEG-LS) is decompressed to Explicit VR Little
    Endian, which every proposed context offers."""
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ""
    if not ts or ts in _UNCOMPRESSED:
        return ds
    sop_class = str(ds.SOPClassUID)
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) == sop_class and ts in [str(t) for t in cx.transfer_syntax]:
            return ds
    out = copy.deepcopy(ds)
    out.decompress(generate_instance_uid=False)  # lossless: the same instance (PS3.5 8.2)
    return out


def send_dicom(
    dest: DestinationSettings,
    calling_ae_title: str,
    objects: Sequence[OutgoingObject],
    *,
    already_acknowledged: Iterable[str] = (),
    commitment_transaction_uid: str | None = None,
) -> AttemptResult:
    """Send ``objects`` to ``dest`` on one association and classify the outcome.

    Objects in ``already_acknowledged`` (an earlier attempt) are not sent again, so a retry
    makes no duplicates; Storage Commitment, when asked for, still covers every object.
    """
    skip = set(already_acknowledged)
    ae = AE(ae_title=calling_ae_title)
    for name in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, name, dest.timeout_seconds)
    _add_contexts(ae, objects, commitment_transaction_uid is not None)
    tls_args = (client_ssl_context(dest.tls), dest.host) if dest.tls.enabled else None
    flags: set[str] = set()
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, lambda _event: flags.add("connected")),
        (evt.EVT_ACCEPTED, lambda _event: flags.add("accepted")),
    ]
    assoc = ae.associate(
        dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args, evt_handlers=handlers
    )
    if not assoc.is_established:
        return _not_established(assoc, flags, dest)
    result = AttemptResult(Outcome.DELIVERED)
    try:
        accepted = [str(cx.abstract_syntax) for cx in assoc.accepted_contexts]
        permanent: list[str] = []
        for obj in objects:
            sop_class = choose_class(obj, accepted)
            if sop_class is None:
                permanent.append(
                    f"{obj.sop_instance_uid}: the peer accepted none of {list(obj.sop_class_uids)}"
                )
                continue
            result.sop_classes[obj.sop_instance_uid] = sop_class
            if obj.sop_instance_uid in skip:
                continue
            if not assoc.is_established:
                result.outcome = Outcome.TRANSIENT
                result.error = f"the peer ended the association before {obj.sop_instance_uid}"
                return result
            try:
                rsp = assoc.send_c_store(_encoded_for(obj.build(sop_class), assoc))
            except ValueError as exc:  # no accepted context for the dataset's transfer syntax
                permanent.append(f"{obj.sop_instance_uid}: {exc}")
                continue
            except RuntimeError as exc:  # the association went away during the send
                result.outcome = Outcome.TRANSIENT
                result.error = f"C-STORE of {obj.sop_instance_uid} interrupted: {exc}"
                return result
            if not rsp or "Status" not in rsp:
                result.outcome = Outcome.TRANSIENT
                result.error = (
                    f"no C-STORE response for {obj.sop_instance_uid} "
                    f"(DIMSE timeout or association aborted)"
                )
                return result
            status = int(rsp.Status)
            verdict = classify_dimse_status(status)
            if verdict is Outcome.DELIVERED:
                result.acknowledged.append(obj.sop_instance_uid)
                continue
            result.status = status
            if verdict is Outcome.TRANSIENT:
                result.outcome = Outcome.TRANSIENT
                result.error = f"C-STORE of {obj.sop_instance_uid} failed with 0x{status:04X}"
                return result
            permanent.append(f"{obj.sop_instance_uid}: C-STORE status 0x{status:04X}")
        if permanent:
            result.outcome = Outcome.PERMANENT
            result.error = "rejected: " + "; ".join(permanent)
            return result
        if commitment_transaction_uid is not None:
            refs = [(result.sop_classes[o.sop_instance_uid], o.sop_instance_uid) for o in objects]
            committed = request_commitment(assoc, commitment_transaction_uid, refs)
            committed.acknowledged = result.acknowledged
            committed.sop_classes = result.sop_classes
            result = committed
        return result
    finally:
        if assoc.is_established:
            assoc.release()
        log.info(
            "c-store attempt",
            extra=fields(
                destination=dest.name,
                outcome=result.outcome.value,
                acknowledged=len(result.acknowledged),
                status=result.status,
            ),
        )
