"""The DICOM listener: Verification and Storage SCP (PS3.4 Annex A and B) on pynetdicom.

The data set of a C-STORE is received into the spool in one of two modes
(:mod:`sijnode.daemon.receive`): on the fast path its ingest starts as soon as the last
fragment has arrived (EVT_DIMSE_RECV) and the reader thread answers; in the standard mode
pynetdicom's C-STORE handler does the same work and pynetdicom answers. Either way one
error boundary maps every failure to a DIMSE status, so the association and the node
survive bad input. No decoding, no inference here.

Associations are checked before they are accepted (calling and called AE title, source
address, the association limit) and recorded in the audit first: an association the
audit cannot record is refused. A failed TLS handshake is recorded as a refusal too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import sqlite3
import ssl
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from sijnode.daemon.dimse import fastpath, sop_classes
from sijnode.daemon.ingest import Ingestor, IngestOutcome, IngestResult
from sijnode.daemon.metrics import NodeMetrics
from sijnode.daemon.receive import ReceiveMode, start_receiving, stop_receiving
from sijnode.daemon.spool import TMP_DIR
from sijnode.daemon.staging import StagedFile
from sijnode.db.engine import record_event, transaction
from sijnode.db.schema import Association, AssociationOutcome, EventType, utcnow
from sijnode.delivery.commitment import CommitmentReportHandler
from sijnode.errors import AuditError, DiskFullError, InvalidInstanceError, SijnodeError, SpoolError
from sijnode.logs import fields
from sijnode.settings import NodeSettings, TLSSettings

log = logging.getLogger(__name__)

# DIMSE statuses (PS3.4 Annex B.2.3 and PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (PS3.8 §9.3.4, Table 9-21): result, source, diagnostic.
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service-user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service-user, no reason given
REJECT_TRANSIENT = (0x02, 0x01, 0x01)  # transient, service-user, no reason given
REJECT_LIMIT = (0x02, 0x03, 0x02)  # transient, service-provider, local limit exceeded


def _database_errors() -> tuple[type[BaseException], ...]:
    """Errors of the audit database's drivers, wherever one escapes unwrapped."""
    errors: list[type[BaseException]] = [SQLAlchemyError, sqlite3.Error]
    try:
        import psycopg
    except ImportError:  # a SQLite-only installation
        pass
    else:
        errors.append(psycopg.Error)
    return tuple(errors)


_DATABASE_ERRORS = _database_errors()

_UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]


def accepted_transfer_syntaxes() -> list[str]:
    """Uncompressed syntaxes, plus every compressed one with an installed pydicom decoder."""
    from pydicom.pixels import get_decoder

    out = [str(uid) for uid in _UNCOMPRESSED]
    for uid in ALL_TRANSFER_SYNTAXES:
        if uid in out:
            continue
        try:
            if get_decoder(UID(uid)).is_available:
                out.append(str(uid))
        except NotImplementedError:
            continue
    return out


def ssl_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """Server-side TLS context (PS3.15 Annex B.1), with client certificates if required."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.cert_file is not None and tls.key_file is not None  # checked by settings
    ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


@dataclass
class _AssocState:
    db_id: int | None
    calling_ae_title: str
    instances: int = 0
    failed: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The data set being received now (a DIMSE message is never interleaved with another).
    receiving: StagedFile | None = None
    # The file for the next data set, made while the peer reads the last answer.
    spare: StagedFile | None = None
    # Whether the reader thread answers its C-STOREs (the fast path, prepared).
    answers: bool = False


class _LimitReached(SijnodeError):
    """The association has sent as many instances as one association may."""


class _ListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server (``AE.make_server``), with failed TLS handshakes
    reported to the listener instead of dropped without a trace."""

    listener: StorageSCP | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; wrap it in TLS when configured (PS3.15 Annex B.1)."""
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is None:
            return client, address
        try:
            return self.ssl_context.wrap_socket(client, server_side=True), address
        except OSError as exc:  # ssl.SSLError, a reset or a timeout mid-handshake
            client.close()
            if self.listener is not None:
                try:
                    self.listener.handshake_failed(address, exc)
                except Exception as report_exc:  # the server must keep serving
                    log.exception(
                        "could not report a failed TLS handshake",
                        extra=fields(error=str(report_exc)),
                    )
            raise  # an OSError: socketserver drops the connection and serves on

    def shutdown(self) -> None:
        """Stop serving and close the socket (the server is not in ``AE`` 's own list)."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageSCP:
    """The listener: allow-lists, association records and the C-STORE handler."""

    def __init__(
        self,
        settings: NodeSettings,
        ingestor: Ingestor,
        metrics: NodeMetrics,
        commitment_handler: CommitmentReportHandler | None = None,
    ) -> None:
        self.settings = settings
        #: Takes Storage Commitment N-EVENT-REPORTs on this listener (None: not offered).
        self.commitment_handler = commitment_handler
        self.ingestor = ingestor
        self.sessions = ingestor.sessions
        self.metrics = metrics
        self._networks = [ipaddress.ip_network(a, strict=False) for a in settings.allowed_addresses]
        self._allowed_aets = {a.strip() for a in settings.allowed_calling_ae_titles}
        self._assocs: dict[int, _AssocState] = {}
        self._lock = threading.Lock()
        self.server: _ListenerServer | None = None
        self._serving: threading.Thread | None = None
        #: The receive mode in effect while listening (``node.receive_mode``, or
        #: ``standard`` where the fast path is not available).
        self.mode: ReceiveMode | None = None
        self._syntaxes = accepted_transfer_syntaxes()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.maximum_pdu_size
        syntaxes = self._syntaxes
        ae.add_supported_context(Verification, syntaxes[:2])
        if self.commitment_handler is not None:
            # the PACS reports commitment results as the SCP of the class (PS3.4 J.3.3)
            CommitmentReportHandler.add_context(ae)
        for cx in StoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        return ae

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the setting was 0 in tests)."""
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Start listening in background threads."""
        tmp_dir = (self.ingestor.spool.root / TMP_DIR).resolve()
        self.mode = start_receiving(self.ae, self, self.settings.receive_mode, tmp_dir)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_REJECTED, self._on_closed, [AssociationOutcome.REJECTED]),
            (evt.EVT_RELEASED, self._on_closed, [AssociationOutcome.RELEASED]),
            (evt.EVT_ABORTED, self._on_closed, [AssociationOutcome.ABORTED]),
            (evt.EVT_CONN_CLOSE, self._on_closed, [AssociationOutcome.ABORTED]),
        ]
        if self.mode == "fast":
            handlers.append((evt.EVT_DIMSE_RECV, self._on_dimse_received))
        if self.commitment_handler is not None:
            handlers += self.commitment_handler.handlers()
        try:
            server = self.ae.make_server(  # the server_class given, typed loosely upstream
                (self.settings.bind_address, self.settings.port),
                evt_handlers=handlers,
                ssl_context=ssl_context(self.settings.tls),
                server_class=_ListenerServer,
            )
            assert isinstance(server, _ListenerServer)
        except BaseException:
            stop_receiving(self.ae, self.mode)
            self.mode = None
            raise
        server.listener = self
        self.server = server
        self._serving = threading.Thread(
            target=server.serve_forever, name="sijnode-listener", daemon=True
        )
        self._serving.start()
        log.info(
            "listening",
            extra=fields(
                ae_title=self.settings.ae_title,
                address=self.settings.bind_address,
                port=self.port,
                tls=self.settings.tls.enabled,
                receive_mode=self.mode,
            ),
        )

    def stop(self) -> None:
        """Stop accepting and close the server; undo the receive mode's settings."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        if self._serving is not None:
            self._serving.join(10)
            self._serving = None
        if self.mode is not None:
            stop_receiving(self.ae, self.mode)
            self.mode = None

    # -- association events -------------------------------------------------------------

    def _address_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def _check(
        self, assoc: PynetAssociation, calling: str, called: str
    ) -> tuple[tuple[int, int, int] | None, str]:
        """The A-ASSOCIATE-RJ and its reason for an association that may not come in."""
        if self._allowed_aets and calling not in self._allowed_aets:
            return REJECT_CALLING_AE, "calling AE title not allowed"
        if not self.settings.accept_any_called_ae_title and called != self.settings.ae_title:
            return REJECT_CALLED_AE, f"called AE title {called!r} is not {self.settings.ae_title!r}"
        if not self._address_allowed(str(assoc.requestor.address)):
            return REJECT_NO_REASON, "source address not allowed"
        # as pynetdicom counts (it checks again after this handler): this one included
        active = sum(1 for a in self.ae.active_associations if a.is_acceptor)
        if active > self.settings.max_associations:
            limit = self.settings.max_associations
            return REJECT_LIMIT, f"association limit of {limit} reached (node.max_associations)"
        return None, ""

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED fires after the A-ASSOCIATE-RQ arrived
        calling = str(request.calling_ae_title).strip()
        called = str(request.called_ae_title).strip()
        reject, reason = self._check(assoc, calling, called)
        if reject is None:
            try:
                self._admit(assoc, calling, called)
                return
            except AuditError as exc:
                reject, reason = REJECT_TRANSIENT, "the audit database cannot record it"
                log.error(
                    "association refused: the audit database cannot record it",
                    extra=fields(calling_ae_title=calling, error=str(exc)),
                )
        self._reject(assoc, calling, called, reject, reason)

    def _reject(
        self,
        assoc: PynetAssociation,
        calling: str,
        called: str,
        reject: tuple[int, int, int],
        reason: str,
    ) -> None:
        """Record the refusal (if the audit can), then send the A-ASSOCIATE-RJ."""
        address = str(assoc.requestor.address)
        self._record_refusal(calling, called, address, assoc.requestor.port, reason)
        # As pynetdicom's own ACSE does: send the A-ASSOCIATE-RJ, then wait for the DUL to
        # deliver it and the peer to close, before the server shuts the socket.
        assoc.acse.send_reject(*reject)
        assoc.kill()

    def _record_refusal(
        self, calling: str, called: str, address: str, port: int | None, reason: str
    ) -> None:
        self.metrics.associations.labels(outcome="rejected").inc()
        log.warning(
            "association rejected",
            extra=fields(calling_ae_title=calling, address=address, reason=reason),
        )
        try:
            with transaction(self.sessions) as session:
                row = Association(
                    calling_ae_title=calling[:16],
                    called_ae_title=called[:16],
                    peer_address=address[:64],
                    peer_port=port,
                    tls=self.settings.tls.enabled,
                    ended_at=utcnow(),
                    outcome=AssociationOutcome.REJECTED,
                    reject_reason=reason,
                )
                session.add(row)
                session.flush()
                record_event(
                    session, EventType.ASSOCIATION_REJECTED, association_id=row.id, reason=reason
                )
        except AuditError as exc:
            log.error("could not record a rejected association", extra=fields(error=str(exc)))

    def handshake_failed(self, address: Any, exc: OSError) -> None:
        """A TLS handshake failed: a refused association, recorded with the reason."""
        host, port = (str(address[0]), int(address[1])) if address else ("", None)
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        self._record_refusal("", "", host, port, f"TLS handshake failed: {why}")

    def _admit(self, assoc: PynetAssociation, calling: str, called: str) -> None:
        """Record an association the checks let in, before it is accepted.

        The state and the row exist before the A-ASSOCIATE-AC goes out, because the peer
        may send its first C-STORE at once and the reader thread handles it
        (:meth:`_on_dimse_received`) while EVT_ACCEPTED is still being delivered. Raises
        AuditError if the row cannot be written: the association is then refused.
        """
        with transaction(self.sessions) as session:
            row = Association(
                calling_ae_title=calling[:16],
                called_ae_title=called[:16],
                peer_address=str(assoc.requestor.address),
                peer_port=assoc.requestor.port,
                tls=self.settings.tls.enabled,
            )
            session.add(row)
            session.flush()
            db_id = row.id
        state = _AssocState(db_id, calling)
        # private and unknown storage classes too (PS3.4 B.5), before negotiation
        sop_classes.support_proposed_storage(assoc, self._syntaxes)
        state.answers = self.mode == "fast" and fastpath.prepare(assoc)
        with self._lock:
            self._assocs[id(assoc)] = state

    def _on_accepted(self, event: evt.Event) -> None:
        state = self._state(event.assoc)
        try:
            with transaction(self.sessions) as session:
                record_event(session, EventType.ASSOCIATION_ACCEPTED, association_id=state.db_id)
        except AuditError as exc:
            log.error(
                "association aborted: the audit database cannot record it",
                extra=fields(association_id=state.db_id, error=str(exc)),
            )
            event.assoc.abort()
            return
        log.info(
            "association accepted",
            extra=fields(
                association_id=state.db_id,
                calling_ae_title=state.calling_ae_title,
                address=event.assoc.requestor.address,
            ),
        )
        self.metrics.associations.labels(outcome="accepted").inc()

    def _on_closed(self, event: evt.Event, outcome: AssociationOutcome) -> None:
        with self._lock:
            state = self._assocs.pop(id(event.assoc), None)
        if state is None:
            return
        partial = state.receiving
        if partial is not None and partial.outcome is None:
            partial.discard()  # cut off mid-transfer: never acknowledged
        if state.spare is not None:
            state.spare.discard()
        if state.db_id is None:
            return
        reason = None
        if outcome is AssociationOutcome.REJECTED:
            # admitted by the checks above, then rejected by pynetdicom's negotiation
            reason = "rejected by pynetdicom during negotiation (e.g. the association limit)"
            self.metrics.associations.labels(outcome="rejected").inc()
        log.info(
            "association closed",
            extra=fields(
                association_id=state.db_id,
                outcome=outcome.value,
                instances=state.instances,
                failed=state.failed,
                reason=reason,
            ),
        )
        try:
            with transaction(self.sessions) as session:
                row = session.get_one(Association, state.db_id)
                row.ended_at = utcnow()
                row.outcome = outcome
                row.instances_received = state.instances
                row.instances_failed = state.failed
                row.bytes_received = state.bytes
                if reason is not None:
                    row.reject_reason = reason
                record_event(
                    session,
                    EventType.ASSOCIATION_CLOSED,
                    association_id=state.db_id,
                    outcome=outcome.value,
                    instances=state.instances,
                    failed=state.failed,
                )
        except AuditError as exc:
            log.error("could not close an association record", extra=fields(error=str(exc)))

    # -- C-STORE ----------------------------------------------------------------------

    def _state(self, assoc: PynetAssociation) -> _AssocState:
        with self._lock:
            state = self._assocs.get(id(assoc))
            if state is None:
                state = _AssocState(None, str(assoc.requestor.ae_title).strip())
                self._assocs[id(assoc)] = state
            return state

    def staged_file(self, assoc: PynetAssociation) -> StagedFile:
        """The file a data set arriving on ``assoc`` is written into (reader thread)."""
        state = self._state(assoc)
        staged, state.spare = state.spare, None
        if staged is None:
            staged = self.ingestor.staged_file()
        state.receiving = staged
        return staged

    def _limit_reached(self, state: _AssocState) -> bool:
        limit = self.settings.max_instances_per_association
        return bool(limit) and state.instances >= limit

    def _on_dimse_received(self, event: evt.Event) -> None:
        """The last fragment of a data set is in: ingest it and answer, on the reader thread.

        pynetdicom would hand the request to the association thread, which polls for it,
        and the response back to this thread, which polls too (up to a millisecond each).
        Answering here skips both waits (:mod:`sijnode.daemon.dimse.fastpath`). Anything
        that goes wrong before the response is sent leaves the request to the association
        thread and :meth:`handle_store`, which reuses the outcome.
        """
        staged = fastpath.staged_of_message(event.message)
        if staged is None:
            return
        state = self._state(event.assoc)
        state.receiving = None
        if not state.answers:
            return  # not prepared for answers from here: the association thread answers
        staged.outcome = self._ingest(staged, state)
        sop_instance_uid = str(event.message.command_set.AffectedSOPInstanceUID or "")
        status = self._answer(staged, state, sop_instance_uid)
        if not fastpath.answer(event, status):
            return  # closing: the association thread decides
        staged.answered = True
        # While the peer reads the answer and prepares its next instance, this thread
        # would only wait: make the next instance's file now.
        state.spare = self.ingestor.staged_file()

    def _ingest(self, staged: StagedFile, state: _AssocState) -> Future[IngestResult]:
        """Ingest ``staged``; a resolved future with the result or the error."""
        started = time.perf_counter()
        outcome: Future[IngestResult] = Future()
        try:
            if self._limit_reached(state):
                staged.discard()
                limit = self.settings.max_instances_per_association
                raise _LimitReached(f"association limit of {limit} instances reached")
            outcome.set_result(self.ingestor.ingest(staged, state.db_id, state.calling_ae_title))
        except Exception as exc:  # noqa: BLE001 - _answer maps it to a DIMSE status
            outcome.set_exception(exc)
        staged.handling_seconds = time.perf_counter() - started
        return outcome

    def handle_store(self, event: evt.Event) -> int:
        """EVT_C_STORE: the standard mode's handler, and the fast path's fallback for a
        request the reader thread did not answer (see above)."""
        state = self._state(event.assoc)
        sop_uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if self.mode == "fast":
            staged = fastpath.staged_of_request(event.request)
        else:
            staged = self._take_over(event)
        if staged is None:
            exc = SijnodeError("the data set was not received into the spool")
            return self._refuse(state, PROCESSING_FAILURE, exc, sop_uid)
        if staged.outcome is None:
            staged.outcome = self._ingest(staged, state)
        return self._answer(staged, state, sop_uid)

    def _take_over(self, event: evt.Event) -> StagedFile | None:
        """Standard mode: the file pynetdicom's chunked receive wrote (public API)."""
        try:
            path = event.dataset_path
        except AttributeError:  # not a C-STORE
            return None
        if path is None:  # chunked receive is off: the data set is not in a file
            return None
        return self.ingestor.adopted_file(Path(path))

    def _answer(self, staged: StagedFile, state: _AssocState, sop_uid: str) -> int:
        """The DIMSE status for an ingested instance, counted once (PS3.4 Annex B.2.3)."""
        if staged.status is not None:
            return staged.status
        started = time.perf_counter()
        assert staged.outcome is not None
        status = SUCCESS
        try:
            result = staged.outcome.result()
        except (DiskFullError, _LimitReached) as exc:
            status = self._refuse(state, OUT_OF_RESOURCES, exc, sop_uid)
        except InvalidInstanceError as exc:
            status = self._refuse(state, CANNOT_UNDERSTAND, exc, sop_uid)
        except (SpoolError, AuditError) as exc:
            status = self._refuse(state, OUT_OF_RESOURCES, exc, sop_uid)
        except _DATABASE_ERRORS as exc:
            # the connection went away where the driver's error was not wrapped (e.g. in
            # the commit's clean-up): out of resources, as for any audit failure
            audit = AuditError(f"audit database write failed: {type(exc).__name__}: {exc}")
            status = self._refuse(state, OUT_OF_RESOURCES, audit, sop_uid)
        except Exception as exc:
            log.exception("C-STORE failed unexpectedly", extra=fields(error=str(exc)))
            status = self._refuse(state, PROCESSING_FAILURE, exc, sop_uid)
        else:
            size = staged.size
            with state.lock:
                state.instances += 1
                if result.outcome is not IngestOutcome.DUPLICATE:
                    state.bytes += size
            self.metrics.instances.labels(outcome=result.outcome.value).inc()
            if result.outcome is not IngestOutcome.DUPLICATE:
                self.metrics.bytes.inc(size)
        staged.status = status
        elapsed = staged.handling_seconds + time.perf_counter() - started
        self.metrics.store_seconds.observe(elapsed)
        return status

    def _refuse(
        self, state: _AssocState, status: int, exc: BaseException, sop_instance_uid: str
    ) -> int:
        with state.lock:
            state.failed += 1
        self.metrics.instances.labels(outcome="refused").inc()
        sop_uid = sop_instance_uid[:64]
        log.error(
            "instance refused",
            extra=fields(status=f"0x{status:04X}", sop_instance_uid=sop_uid, error=str(exc)),
        )
        try:
            with transaction(self.sessions) as session:
                record_event(
                    session,
                    EventType.INSTANCE_REFUSED,
                    association_id=state.db_id,
                    status=f"0x{status:04X}",
                    sop_instance_uid=sop_uid,
                    error=str(exc)[:500],
                    kind=type(exc).__name__,
                )
        except SijnodeError as audit_exc:
            log.error("could not record a refused instance", extra=fields(error=str(audit_exc)))
        return status
