"""Accept every storage SOP class a peer proposes, private and unknown ones included.

A PACS sends a study as it has it; many MR studies carry a private non-image object
(Siemens CSA Non-Image, 1.3.12.2.1107.5.9.1). If the listener rejects its presentation
context, some senders fail the whole push, so the listener supports, for each association,
every proposed abstract syntax that is storage-like (PS3.4 Annex B): a private UID, or one
pynetdicom does not know as any other service. Such a class is registered once with
pynetdicom's Storage service (``pynetdicom.register_uid``, public API) so that pynetdicom's
own C-STORE handling serves it, and added to the association's supported contexts with
the listener's transfer syntaxes (so the negotiation keeps the listener's preferences).
Routing later ignores what no pipeline reads (:mod:`sijnode.daemon.routing`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pydicom.uid import UID
from pynetdicom import register_uid, sop_class
from pynetdicom.presentation import build_context
from pynetdicom.service_class import ServiceClass, StorageServiceClass

from sijnode.logs import fields
from sijnode.uids import is_valid_uid

log = logging.getLogger(__name__)

#: Classes registered at most, so that peers cannot grow pynetdicom's registry forever.
MAX_REGISTERED = 1024

_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


def storage_like(uid: str) -> bool:
    """Whether a proposed abstract syntax may be served as storage (PS3.4 B.5): a storage
    class, a private class, or one pynetdicom knows as no other service."""
    if not is_valid_uid(uid):
        return False
    service = sop_class.uid_to_service_class(uid)
    if service is StorageServiceClass or UID(uid).is_private:
        return True
    return service is ServiceClass  # the base class: a service pynetdicom does not know


def _register(uid: str) -> bool:
    if sop_class.uid_to_service_class(uid) is StorageServiceClass:
        return True  # known (or registered before)
    with _LOCK:
        if uid in _REGISTERED:
            return True
        if len(_REGISTERED) >= MAX_REGISTERED:
            return False
        register_uid(uid, "SijnodeStorage_" + uid.replace(".", "_"), StorageServiceClass)
        _REGISTERED.add(uid)
    log.info("storage SOP class registered", extra=fields(sop_class_uid=uid))
    return True


def support_proposed_storage(assoc: Any, transfer_syntaxes: list[str]) -> int:
    """Add every storage-like class ``assoc``'s requestor proposes to its supported
    contexts (EVT_REQUESTED, before negotiation); return how many were added."""
    supported = list(assoc.acceptor.supported_contexts)
    known = {str(cx.abstract_syntax) for cx in supported}
    added = 0
    for cx in assoc.requestor.requested_contexts:
        uid = str(cx.abstract_syntax)
        if uid in known or not storage_like(uid):
            continue
        if not _register(uid):
            log.warning(
                "storage SOP class not accepted: registry full",
                extra=fields(sop_class_uid=uid, limit=MAX_REGISTERED),
            )
            continue
        supported.append(build_context(uid, transfer_syntaxes))
        known.add(uid)
        added += 1
    if added:
        assoc.acceptor.supported_contexts = supported
    return added
