"""Deterministic UIDs of the objects one job emits (PS3.5 §9, Annex B).

Every output UID is a hash of the job key, the object's role and its index under the
node's root (``node.uid_root``), so building the outputs of a job again, e.g. for a
re-sent delivery, gives the same Series and SOP Instance UIDs and the destination stores
no second copy. The job key is itself a content hash (``daemon/dispatch.job_key``) and the
UID is a one-way hash of it, so no identifier can be read from a UID.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydicom.uid import UID

from sijnode.errors import ReportError
from sijnode.uids import is_valid_uid, make_uid

#: Version of the derivation below: changing it would change every output UID.
_SCHEME = "sijnode-report-v1"


class Role(enum.StrEnum):
    """What a UID identifies; part of its hash."""

    SR_SERIES = "sr-series"
    SR = "sr"
    SC_SERIES = "sc-series"
    SC = "sc"
    KO_SERIES = "ko-series"
    KO = "ko"
    TRACKING = "tracking"
    DEVICE = "device"


def output_uid(uid_root: str, job_key: str, role: Role, index: int = 0, variant: str = "") -> UID:
    """The UID of object ``index`` of ``role`` for job ``job_key`` (``variant``: e.g. SOP class)."""
    if not job_key:
        raise ReportError("expected a non-empty job key to derive output UIDs from, got ''")
    uid = make_uid(
        uid_root, [_SCHEME, f"job={job_key}", f"role={role.value}", f"index={index}", variant]
    )
    if not is_valid_uid(uid):
        raise ReportError(f"expected a valid UID under root {uid_root!r}, got {uid!r}")
    return uid


def device_uid(uid_root: str, ae_title: str) -> UID:
    """Device Observer UID of this node (TID 1004): stable for the node, not the job."""
    return make_uid(uid_root, [_SCHEME, "device", ae_title])


@dataclass(frozen=True)
class JobUIDs:
    """All output UIDs of one job."""

    uid_root: str
    job_key: str

    def uid(self, role: Role, index: int = 0, variant: str = "") -> UID:
        """See :func:`output_uid`."""
        return output_uid(self.uid_root, self.job_key, role, index, variant)

    @property
    def sr_series(self) -> UID:
        return self.uid(Role.SR_SERIES)

    @property
    def sc_series(self) -> UID:
        return self.uid(Role.SC_SERIES)

    @property
    def ko_series(self) -> UID:
        return self.uid(Role.KO_SERIES)

    def sr(self, sop_class_uid: str) -> UID:
        """The SR's SOP Instance UID: one per SR class, as an instance has one SOP class."""
        return self.uid(Role.SR, 0, variant=f"class={sop_class_uid}")

    def sc(self, index: int) -> UID:
        return self.uid(Role.SC, index)

    def ko(self) -> UID:
        return self.uid(Role.KO)

    def tracking(self, index: int) -> UID:
        """Tracking UID of measurement group ``index`` (0 = the decision group)."""
        return self.uid(Role.TRACKING, index)
