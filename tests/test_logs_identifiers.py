"""No patient identifier reaches a log line: not through pydicom's value checks, not
through the parameters of a failed SQL statement."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import text

from sijnode.db.engine import make_engine, make_sessionmaker, transaction
from sijnode.errors import AuditError
from sijnode.logs import JsonFormatter, configure_logging

SECRET = "PATIENT-4711-DOE"


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    configure_logging("DEBUG", json_format=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    yield stream
    logging.getLogger().removeHandler(handler)
    configure_logging("INFO", json_format=True)


def _bad_file(path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID = SECRET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.PatientBirthDate = f"19{SECRET}"  # invalid DA whose value is an identifier
        ds.save_as(path, enforce_file_format=True)
    return path


def test_invalid_values_are_read_without_logging_them(
    tmp_path: Path, captured: io.StringIO
) -> None:
    path = _bad_file(tmp_path / "bad.dcm")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path)
        assert SECRET in str(ds.PatientBirthDate)  # read tolerantly, value kept
    assert SECRET not in captured.getvalue()
    assert not [w for w in seen if SECRET in str(w.message)]


def test_a_failed_statement_does_not_carry_its_values(
    tmp_path: Path, captured: io.StringIO
) -> None:
    sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'a.db'}"))
    with transaction(sessions) as s:
        s.execute(text("create table t (v text unique)"))
        s.execute(text("insert into t values (:v)"), {"v": SECRET})
    with pytest.raises(AuditError) as info:
        with transaction(sessions) as s:
            s.execute(text("insert into t values (:v)"), {"v": SECRET})
    assert "IntegrityError" in str(info.value)
    assert SECRET not in str(info.value)
    logging.getLogger("sijnode.test").error("write failed", exc_info=info.value)
    assert SECRET not in captured.getvalue()
