"""Commands of the synth part: ``sijnode synth``."""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from sijnode.settings import SettingsLoader
    from sijnode.synth.dataset import ModalityChoice
    from sijnode.synth.truth import SynthStudy


class ModalityOption(StrEnum):
    """Which studies to make per subject."""

    ct = "ct"
    mr = "mr"
    both = "both"


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``synth`` to the ``sijnode`` app; ``settings`` loads this invocation's settings."""

    @app.command("synth")
    def synth_command(
        out: Path = typer.Option(..., "--out", help="New or empty output directory."),
        modality: ModalityOption = typer.Option(
            ModalityOption.both, "--modality", help="ct, mr or both (one study of each)."
        ),
        subjects: int = typer.Option(4, "--subjects", min=1, max=9999, help="Number of subjects."),
        positive_fraction: float = typer.Option(
            0.5, "--positive-fraction", min=0.0, max=1.0, help="Share of sacroiliitis subjects."
        ),
        seed: int = typer.Option(0, "--seed", min=0, help="Same seed, same bytes."),
        slices: int | None = typer.Option(
            None,
            "--slices",
            help="Slices per study (CT 1-300, default 24; MR 4-64, default 20-37 per subject).",
        ),
    ) -> None:
        """Write synthetic SI-joint CT/MR studies with known truth (labels.csv, rois.csv)."""
        synth(settings().node.uid_root, out, modality, subjects, positive_fraction, seed, slices)


def synth(
    uid_root: str,
    out: Path,
    modality: ModalityOption,
    subjects: int,
    positive_fraction: float,
    seed: int,
    slices: int | None,
) -> None:
    """Write the synthetic studies and their truth files, listing each study as it is written."""
    from sijnode.synth.dataset import generate_dataset, write_dataset

    parameters: dict[str, object] = {
        "modality": modality.value,
        "subjects": subjects,
        "positive_fraction": positive_fraction,
        "seed": seed,
        "slices": slices,
        "uid_root": uid_root,
    }
    choices: dict[str, ModalityChoice] = {"ct": "ct", "mr": "mr", "both": "both"}
    studies = generate_dataset(
        seed, subjects, positive_fraction, choices[modality.value], slices, uid_root
    )
    typer.echo(f"{'subject':<10} {'modality':<8} {'label':>5} {'side':<6} {'slices':>6}  folder")

    def listed() -> Iterator[SynthStudy]:
        for study in studies:
            yield study
            typer.echo(
                f"{study.subject_id:<10} {study.modality:<8} {study.label:>5} {study.side:<6} "
                f"{len(study.slices):>6}  {study.subject_id}/{study.modality.lower()}"
            )

    manifest = write_dataset(out, listed(), parameters)
    positives = sum(int(row["label"]) for row in manifest.labels)
    typer.echo(
        f"wrote {len(manifest.labels)} studies ({positives} positive) to {manifest.out_dir}; "
        f"truth in {manifest.labels_csv.name} and {manifest.rois_csv.name}"
    )
