"""The objects a delivery sends: a dataset, or a factory that encodes it in the SOP class
that the peer accepted (the SR: Comprehensive, Enhanced or Comprehensive 3D).

An :class:`OutgoingObject` lists the SOP classes it can be sent as, best first; the SCU
proposes all of them and asks the factory for the first one the peer accepted
(DICOM-OUTPUTS.md: choose the SR class after association negotiation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from sijnode.errors import DeliveryError

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
#: The SR classes proposed for every report, best first (issue 11).
SR_CLASSES: tuple[str, ...] = (COMPREHENSIVE_SR, ENHANCED_SR, COMPREHENSIVE_3D_SR)

#: Builds the object in the given SOP class.
Factory = Callable[[str], Dataset]
#: Re-encodes an SR dataset in another SR class.
SRReencoder = Callable[[Dataset, str], Dataset]


@dataclass(frozen=True)
class OutgoingObject:
    """One object to send: its SOP Instance UID, the classes it can go as, a factory."""

    sop_instance_uid: str
    sop_class_uids: tuple[str, ...]
    factory: Factory
    transfer_syntax_uid: str

    def build(self, sop_class_uid: str) -> Dataset:
        """The dataset in ``sop_class_uid`` (one of :attr:`sop_class_uids`)."""
        if sop_class_uid not in self.sop_class_uids:
            raise DeliveryError(
                f"expected one of {self.sop_class_uids} for {self.sop_instance_uid}, "
                f"got {sop_class_uid}"
            )
        ds = self.factory(sop_class_uid)
        if str(ds.SOPClassUID) != sop_class_uid:
            raise DeliveryError(
                f"the factory of {self.sop_instance_uid} was asked for {sop_class_uid} and "
                f"returned {ds.SOPClassUID}"
            )
        return ds


def relabel_sr(ds: Dataset, sop_class_uid: str) -> Dataset:
    """The same SR content under another SR storage class.

    Valid for content that every proposed class allows (TID 1500 with 2D SCOORD and no
    SCOORD3D, as sijnode's reports are; DICOM-OUTPUTS.md: all three validate).
    """
    out = ds.copy()
    out.SOPClassUID = UID(sop_class_uid)
    if hasattr(out, "file_meta"):
        meta = FileMetaDataset(out.file_meta)
        meta.MediaStorageSOPClassUID = UID(sop_class_uid)
        out.file_meta = meta
    return out


def from_dataset(ds: Dataset, *, sr_reencoder: SRReencoder | None = relabel_sr) -> OutgoingObject:
    """An object for a dataset; an SR is offered in every class of :data:`SR_CLASSES`."""
    sop_class = str(ds.SOPClassUID)
    ts = str(getattr(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID", "")) or (
        "1.2.840.10008.1.2.1"
    )
    if sop_class in SR_CLASSES and sr_reencoder is not None:
        reencode = sr_reencoder

        def factory(uid: str) -> Dataset:
            return ds if uid == sop_class else reencode(ds, uid)

        return OutgoingObject(str(ds.SOPInstanceUID), SR_CLASSES, factory, ts)
    return OutgoingObject(str(ds.SOPInstanceUID), (sop_class,), lambda _uid: ds, ts)


def from_file(path: Path, *, sr_reencoder: SRReencoder | None = relabel_sr) -> OutgoingObject:
    """An object for a DICOM file (read when the delivery is prepared)."""
    try:
        ds = dcmread(path)
    except (OSError, ValueError) as exc:
        raise DeliveryError(f"expected a readable DICOM file at {path}, got: {exc}") from exc
    return from_dataset(ds, sr_reencoder=sr_reencoder)


def sop_classes_to_propose(objects: Iterable[OutgoingObject]) -> dict[str, set[str]]:
    """SOP class -> transfer syntaxes to propose for it."""
    out: dict[str, set[str]] = {}
    for obj in objects:
        for uid in obj.sop_class_uids:
            out.setdefault(uid, set()).add(obj.transfer_syntax_uid)
    return out


def choose_class(obj: OutgoingObject, accepted: Sequence[str]) -> str | None:
    """The first of the object's classes that the peer accepted, or ``None``."""
    return next((uid for uid in obj.sop_class_uids if uid in accepted), None)
