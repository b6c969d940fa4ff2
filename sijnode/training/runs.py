"""The run directory: everything needed to know what a run did and to resume it.

::

    RUN_DIR/
      config.json      the command's options (resolved), seeds
      version.json     sijnode.__version__ and ``git describe`` where available
      data.json        SHA-256 of the data set (CSV files and every DICOM file), counts
      splits.json      the subjects of every split
      metrics.json     per-epoch metrics of every job; metrics.csv the same as a table
      jobs/            one JSON per finished job (validation and test predictions)
      state/           per-epoch resumable state of the running job (removed when done)
      plots/           PNG figures; report.md shows them
      model.safetensors  the exported checkpoint
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sijnode import __version__
from sijnode.errors import TrainingError
from sijnode.training.data import StudyRecord

#: Options that may differ between a run and its resumption.
RESUME_FREE = {"resume", "quiet", "stop_after", "device"}


def code_version() -> dict[str, str | None]:
    """sijnode's version and ``git describe --always --dirty`` of the checkout, if any."""
    describe = None
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        describe = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        describe = None
    return {"sijnode": __version__, "git": describe}


def data_hash(root: Path, studies: Sequence[StudyRecord]) -> dict[str, Any]:
    """SHA-256 over the CSV files and every slice file (relative path and bytes)."""
    digest = hashlib.sha256()
    for name in ("labels.csv", "rois.csv"):
        path = root / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    files = sorted(s.path for study in studies for s in study.slices)
    for path in files:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return {
        "sha256": digest.hexdigest(),
        "studies": len(studies),
        "subjects": len({s.subject for s in studies}),
        "positive_studies": sum(s.label for s in studies),
        "slices": len(files),
    }


class RunDir:
    """A run directory, new or resumed."""

    def __init__(self, path: Path, config: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.config = config
        config_path = path / "config.json"
        if resume:
            if not config_path.is_file():
                raise TrainingError(
                    f"--resume: {path} has no config.json: expected a run directory"
                )
            old = json.loads(config_path.read_text())
            diff = sorted(
                k
                for k in set(old) | set(config)
                if k not in RESUME_FREE and old.get(k) != config.get(k)
            )
            if diff:
                raise TrainingError(
                    f"--resume: the options differ from the interrupted run in {diff}: expected "
                    f"{ {k: old.get(k) for k in diff} }, found { {k: config.get(k) for k in diff} }"
                )
        elif path.exists() and any(path.iterdir()):
            raise TrainingError(
                f"{path}: expected a new or empty run directory, found files "
                "(use --resume to continue an interrupted run)"
            )
        for sub in ("jobs", "state", "plots"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        if not resume:
            self.write_json("config.json", config)
            self.write_json("version.json", code_version())

    def write_json(self, name: str, value: Any) -> Path:
        target = self.path / name
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(value, indent=2, sort_keys=False, default=_default))
        tmp.replace(target)
        return target

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def job_done(self, name: str) -> dict[str, Any] | None:
        path = self.path / "jobs" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def finish_job(self, name: str, result: dict[str, Any]) -> None:
        self.write_json(f"jobs/{name}.json", result)

    def write_metrics(self, histories: dict[str, list[dict[str, float]]]) -> None:
        self.write_json("metrics.json", histories)
        keys: list[str] = []
        for rows in histories.values():
            for row in rows:
                keys += [k for k in row if k not in keys]
        with (self.path / "metrics.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, ["job", *keys])
            writer.writeheader()
            for job, rows in histories.items():
                for row in rows:
                    writer.writerow({"job": job, **row})


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value)}")
