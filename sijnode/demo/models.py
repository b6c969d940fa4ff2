"""Synthetic training data and quick checkpoints for the demo, cached between runs.

The cache directory is named after a hash of the sijnode version and every option that
changes the data or the training (sizes, epochs, folds, seeds), so a second run with the
same options reuses the checkpoints and a changed option trains anew. A run directory
without its exported ``model.safetensors`` (an interrupted training) is trained again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sijnode import __version__
from sijnode.demo.processes import Processes, sijnode_command

#: The three checkpoints of the demo: (name, train command, synthetic data set).
TRAINED = (("ct", "ct", "ct"), ("mr", "mr", "mr"), ("localizer", "localizer", "mr"))


@dataclass(frozen=True)
class TrainingPlan:
    """What the demo trains: data set sizes and the quick training options."""

    #: The data sizes and options of the training tools' learning check
    #: (tests/test_training_learning.py); its CT run (about 5 min on a 2-core CPU) is most
    #: of the first demo run, which stays under 10 minutes there.
    ct_subjects: int = 96
    ct_slices: int = 4
    mr_subjects: int = 48
    #: MR slices per study: a stack centred on the joints, where every slice shows both
    #: ilia (the training tools need both ROI boxes on every slice).
    mr_slices: int = 8
    seed: int = 7
    #: Extra options per training command (``sijnode train NAME --quick ...``).
    options: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "ct": ("--size", "96", "--epochs", "16", "--folds", "1"),
            "mr": (
                "--size",
                "48",
                "--epochs",
                "12",
                "--folds",
                "1",
                "--no-compare",
                "--optimizer",
                "adam",
            ),
            "localizer": (),
        }
    )

    def key(self) -> str:
        """Cache key: the sijnode version and every option, hashed (12 hex digits)."""
        blob = json.dumps({"version": __version__, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Checkpoints:
    """Exported checkpoint files, and whether they came from the cache."""

    ct: Path
    mr: Path
    localizer: Path
    cached: bool


def synth(
    procs: Processes,
    out: Path,
    modality: str,
    subjects: int,
    seed: int,
    log: Path,
    slices: int | None = None,
) -> Path:
    """``sijnode synth`` into ``out`` (skipped when ``out/labels.csv`` exists)."""
    if (out / "labels.csv").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    args = ["synth", "--modality", modality, "--subjects", str(subjects), "--seed", str(seed)]
    args += ["--out", str(out)]
    if slices is not None:
        args += ["--slices", str(slices)]
    procs.run(f"synth {modality}", sijnode_command(None, *args), log, timeout=600)
    return out


def trained_checkpoints(
    procs: Processes, cache_root: Path, plan: TrainingPlan, log: Path, say: object
) -> Checkpoints:
    """The demo's checkpoints: from ``cache_root/<key>`` or trained there now."""
    assert callable(say)
    cache = cache_root / plan.key()
    data = {
        "ct": cache / "data-ct",
        "mr": cache / "data-mr",
    }
    paths = {name: cache / name / "model.safetensors" for name, _, _ in TRAINED}
    if all(p.is_file() for p in paths.values()):
        say(f"checkpoints from the cache {cache}")
        return Checkpoints(paths["ct"], paths["mr"], paths["localizer"], cached=True)
    say(f"making training data in {cache}")
    synth(procs, data["ct"], "ct", plan.ct_subjects, plan.seed, log, slices=plan.ct_slices)
    synth(procs, data["mr"], "mr", plan.mr_subjects, plan.seed + 1, log, slices=plan.mr_slices)
    for name, command, dataset in TRAINED:
        if paths[name].is_file():
            continue
        run_dir = cache / name
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again
        say(f"training {name} (sijnode train {command} --quick {' '.join(plan.options[name])})")
        args = ["train", command, "--data", str(data[dataset]), "--out", str(run_dir)]
        args += ["--quick", "--quiet", "--seed", str(plan.seed), *plan.options[name]]
        procs.run(f"train {name}", sijnode_command(None, *args), log, timeout=1800)
    return Checkpoints(paths["ct"], paths["mr"], paths["localizer"], cached=False)
