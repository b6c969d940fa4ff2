"""The demo's local PACS: Orthanc when installed, DCMTK ``storescp`` otherwise.

Orthanc knows the node as its modality ``sijnode`` (with Storage Commitment), holds the
held-out studies (REST ``POST /instances``) and pushes them to the node
(``POST /modalities/sijnode/store``); the node sends its results back to Orthanc. With
``storescp`` the studies are sent with ``storescu`` and the results land in a folder.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sijnode.demo.processes import DemoError, Processes, wait_until

PACS_AE = "DEMOPACS"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _request(url: str, body: bytes | None = None, timeout: float = 60) -> Any:
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


@dataclass
class Pacs:
    """A started local PACS."""

    kind: str  # "orthanc" or "storescp"
    dicom_port: int
    folder: Path
    http_port: int | None = None
    #: StudyInstanceUID -> Orthanc study id (Orthanc only).
    orthanc_ids: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def study_url(self, study_uid: str) -> str | None:
        """Where a person sees the study (Orthanc Explorer), or ``None``."""
        if self.kind != "orthanc" or study_uid not in self.orthanc_ids:
            return None
        return f"{self.base}/app/explorer.html#study?uuid={self.orthanc_ids[study_uid]}"

    def load(self, files: list[Path]) -> None:
        """Put the studies into the PACS (Orthanc: upload; storescp: kept on disk)."""
        if self.kind != "orthanc":
            return
        for path in files:
            answer = _request(f"{self.base}/instances", path.read_bytes())
            uid = _request(f"{self.base}/studies/{answer['ParentStudy']}")["MainDicomTags"][
                "StudyInstanceUID"
            ]
            self.orthanc_ids[uid] = answer["ParentStudy"]

    def push(self, procs: Processes, study_uid: str, files: list[Path], node_port: int) -> None:
        """Send one study from the PACS to the node."""
        if self.kind == "orthanc":
            orthanc_id = self.orthanc_ids[study_uid]
            try:
                _request(f"{self.base}/modalities/sijnode/store", orthanc_id.encode(), timeout=300)
            except urllib.error.HTTPError as exc:
                raise DemoError(f"Orthanc could not send study {study_uid}: {exc}") from exc
            return
        storescu = shutil.which("storescu")
        if storescu is None:
            raise DemoError("storescu (DCMTK) is needed to send studies; apt-get install dcmtk")
        cmd = [storescu, "-aet", PACS_AE, "-aec", "SIJNODE", "127.0.0.1", str(node_port)]
        procs.run("storescu", cmd + [str(p) for p in files], self.folder / "storescu.log", 300)

    def held(self, study_uid: str) -> list[dict[str, str]]:
        """The series the PACS holds for the study: modality, description, instances."""
        if self.kind == "orthanc":
            oid = self.orthanc_ids.get(study_uid)
            if oid is None:
                return []
            series = _request(f"{self.base}/studies/{oid}/series?expand")
            return [
                {
                    "modality": s["MainDicomTags"].get("Modality", ""),
                    "description": s["MainDicomTags"].get("SeriesDescription", ""),
                    "instances": str(len(s["Instances"])),
                }
                for s in series
            ]
        return []


def start_pacs(
    procs: Processes, folder: Path, dicom_port: int, http_port: int, node_port: int
) -> Pacs:
    """Orthanc (with sijnode as its modality) when installed, else ``storescp``."""
    folder.mkdir(parents=True, exist_ok=True)
    orthanc = shutil.which("Orthanc")
    if orthanc is not None:
        config: dict[str, Any] = {
            "Name": "sijnode-demo-pacs",
            "StorageDirectory": str(folder / "orthanc-db"),
            "IndexDirectory": str(folder / "orthanc-db"),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "DicomAet": PACS_AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {
                "sijnode": {
                    "AET": "SIJNODE",
                    "Host": "127.0.0.1",
                    "Port": node_port,
                    "AllowStorageCommitment": True,
                }
            },
        }
        if DICOMWEB_PLUGIN.is_file():
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        procs.start("Orthanc", [orthanc, str(folder / "orthanc.json")], folder / "orthanc.log")
        pacs = Pacs("orthanc", dicom_port, folder, http_port)

        def answers() -> bool:
            procs.check_alive("Orthanc")
            try:
                _request(f"{pacs.base}/system", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False
            return True

        wait_until("Orthanc answering", answers, timeout=90)
        return pacs
    storescp = shutil.which("storescp")
    if storescp is None:
        raise DemoError(
            "neither Orthanc nor storescp is installed; apt-get install orthanc (or dcmtk)"
        )
    received = folder / "received"
    received.mkdir(exist_ok=True)
    cmd = [storescp, "-aet", PACS_AE, "-od", str(received), "+uf", str(dicom_port)]
    procs.start("storescp", cmd, folder / "storescp.log")
    return Pacs("storescp", dicom_port, received)
