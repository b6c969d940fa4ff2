"""Which model a pipeline runs: the checkpoint file and its hash.

The job key includes the model version, so a re-sent study with the same content and the
same weights never runs twice, while new weights give a new job (LANDSCAPE.md, lead 2).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sijnode.errors import ConfigurationError
from sijnode.settings import PipelineSettings


@dataclass(frozen=True)
class ModelIdentity:
    """A pipeline's model as recorded with every job."""

    pipeline: str
    checkpoint: Path
    weights_sha256: str

    @property
    def version(self) -> str:
        """Short, stable version string: pipeline name and weights hash prefix."""
        return f"{self.pipeline}-{self.weights_sha256[:12]}"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelIdentities:
    """Model identities of the configured pipelines, hashing each checkpoint once.

    A checkpoint is hashed again only when its size or modification time changes, so
    routing a study does not read a large weights file every time.
    """

    def __init__(self, pipelines: dict[str, PipelineSettings]) -> None:
        self.pipelines = pipelines
        self._hashes: dict[tuple[str, int, int], str] = {}

    def __call__(self, pipeline: str) -> ModelIdentity | None:
        """The identity of ``pipeline``'s model, or None without a checkpoint."""
        settings = self.pipelines.get(pipeline)
        if settings is None or settings.checkpoint is None:
            return None
        path = settings.checkpoint
        try:
            stat = path.stat()
        except OSError as exc:
            raise ConfigurationError(
                f"pipelines.{pipeline}.checkpoint = {str(path)!r}: expected an existing file"
            ) from exc
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(path)
        return ModelIdentity(pipeline, path, self._hashes[key])
