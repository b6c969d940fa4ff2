"""``sijnode train ct|mr|localizer`` and ``sijnode evaluate`` (docs/training.md).

Light at import (typer only); torch and the protocols load inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sijnode.settings import SettingsLoader

_DATA = typer.Option(..., "--data", help="Data set folder with labels.csv and rois.csv.")
_HELP = {
    "--quick": "Small inputs, few epochs and folds (minutes on a CPU).",
    "--device": "cpu, cuda or cuda:N.",
    "--seed": "Seed of splits, initialisation, batch order and augmentation.",
    "--pretrained": "Local ImageNet weights (safetensors file or folder); nothing is downloaded.",
    "--resume": "Continue an interrupted run in the same run directory.",
    "--quiet": "No progress bars or epoch lines (scripts, CI).",
    "--epochs": "Epochs per job.",
    "--size": "Input (MR: ROI patch) size in pixels.",
    "--batch-size": "Batch size.",
    "--lr": "Initial learning rate (cosine decay from it).",
    "--target-sensitivity": "Thresholds reach this validation sensitivity (default: Youden's J).",
    "--stop-after": "Stop after N epochs in total (tests of --resume).",
    "--max-subjects": "Use only the first N subjects (smoke runs).",
}
_OUT = typer.Option(..., "--out", help="Run directory (new or empty; or the one to --resume).")


def register(app: typer.Typer, settings: SettingsLoader) -> None:
    """Add ``sijnode train`` (ct, mr, localizer) and ``sijnode evaluate``."""
    train = typer.Typer(
        help="Train models as the papers did (research use only).", no_args_is_help=True
    )
    app.add_typer(train, name="train")

    def options(**values: Any) -> Any:
        import os

        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        from sijnode.training.common import TrainOptions

        return TrainOptions(**values)

    @train.command("ct")
    def train_ct(
        data: Path = _DATA,
        out: Path = _OUT,
        quick: bool = typer.Option(False, "--quick", help="Small images, few epochs and folds."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
        seed: int = typer.Option(0, "--seed", help="Seed of splits, initialisation, order."),
        pretrained: Path | None = typer.Option(
            None, "--pretrained", help="Local ImageNet weights (safetensors file or folder)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars (scripts, CI)."),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help="Epochs per job."),
        folds: int | None = typer.Option(
            None, "--folds", min=1, help="Cross-validation folds (1: holdout split only)."
        ),
        compare: bool = typer.Option(
            False, "--compare", help="Train all five architectures of Fu et al. 2024."
        ),
        size: int | None = typer.Option(None, "--size", min=32, help="Input size in pixels."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=2, help=_HELP["--batch-size"]
        ),
        lr: float | None = typer.Option(None, "--lr", help="Initial learning rate."),
        whitening: bool = typer.Option(
            True, "--whitening/--no-whitening", help="ZCA whitening fitted on training data."
        ),
        body_crop: bool = typer.Option(
            True, "--body-crop/--no-body-crop", help="Crop each slice to the body before resizing."
        ),
        target_sensitivity: float | None = typer.Option(
            None,
            "--target-sensitivity",
            min=0.0,
            max=1.0,
            help="Thresholds reach this validation sensitivity (default: Youden's J).",
        ),
        stop_after: int | None = typer.Option(
            None, "--stop-after", hidden=True, help=_HELP["--stop-after"]
        ),
        max_subjects: int | None = typer.Option(
            None, "--max-subjects", min=3, help=_HELP["--max-subjects"]
        ),
    ) -> None:
        """Train the CT slice classifier (Fu et al. 2024); exports RUN_DIR/model.safetensors."""
        values = {k: v for k, v in locals().items() if k != "options"}
        from sijnode.training.ct_study import run_ct

        path = run_ct(options(**values))
        typer.echo(f"wrote {path} and {path.parent / 'report.md'}")

    @train.command("mr")
    def train_mr(
        data: Path = _DATA,
        out: Path = _OUT,
        quick: bool = typer.Option(False, "--quick", help="Small patches, few epochs, 2 repeats."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
        seed: int = typer.Option(0, "--seed", help=_HELP["--seed"]),
        pretrained: Path | None = typer.Option(None, "--pretrained", help=_HELP["--pretrained"]),
        resume: bool = typer.Option(False, "--resume", help=_HELP["--resume"]),
        quiet: bool = typer.Option(False, "--quiet", help=_HELP["--quiet"]),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help=_HELP["--epochs"]),
        folds: int | None = typer.Option(
            None, "--folds", min=1, help="Repeats of the 70/30 split."
        ),
        compare: bool = typer.Option(
            True,
            "--compare/--no-compare",
            help="Also train ResNet18 on whole images and ResNet50 on ROI patches (Table 2).",
        ),
        size: int | None = typer.Option(None, "--size", min=32, help="ROI patch size."),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=2, help=_HELP["--batch-size"]
        ),
        lr: float | None = typer.Option(None, "--lr", help=_HELP["--lr"]),
        target_sensitivity: float | None = typer.Option(
            None, "--target-sensitivity", min=0.0, max=1.0, help=_HELP["--target-sensitivity"]
        ),
        stop_after: int | None = typer.Option(
            None, "--stop-after", hidden=True, help=_HELP["--stop-after"]
        ),
        max_subjects: int | None = typer.Option(
            None, "--max-subjects", min=3, help=_HELP["--max-subjects"]
        ),
        optimizer: str = typer.Option(
            "sgd",
            "--optimizer",
            help="sgd (the paper's lr 0.03, momentum 0.9) or adam (lr 1e-3; converges in "
            "fewer steps from scratch).",
        ),
    ) -> None:
        """Train the MR ROI classifier (Lee et al. 2021); exports RUN_DIR/model.safetensors."""
        values = {k: v for k, v in locals().items() if k != "options"}
        if optimizer not in ("sgd", "adam"):
            raise typer.BadParameter(f"expected sgd or adam, got {optimizer!r}")
        from sijnode.training.mr_study import run_mr

        path = run_mr(options(**values))
        typer.echo(f"wrote {path} and {path.parent / 'report.md'}")

    @train.command("localizer")
    def train_localizer(
        data: Path = _DATA,
        out: Path = _OUT,
        quick: bool = typer.Option(False, "--quick", help=_HELP["--quick"]),
        device: str = typer.Option("cpu", "--device", help=_HELP["--device"]),
        seed: int = typer.Option(0, "--seed", help=_HELP["--seed"]),
        resume: bool = typer.Option(False, "--resume", help=_HELP["--resume"]),
        quiet: bool = typer.Option(False, "--quiet", help=_HELP["--quiet"]),
        epochs: int | None = typer.Option(None, "--epochs", min=1, help=_HELP["--epochs"]),
        size: int | None = typer.Option(None, "--size", min=32, help=_HELP["--size"]),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=2, help=_HELP["--batch-size"]
        ),
        lr: float | None = typer.Option(None, "--lr", help=_HELP["--lr"]),
        stop_after: int | None = typer.Option(
            None, "--stop-after", hidden=True, help=_HELP["--stop-after"]
        ),
        max_subjects: int | None = typer.Option(
            None, "--max-subjects", min=3, help=_HELP["--max-subjects"]
        ),
        augment: bool = typer.Option(
            True,
            "--augment/--no-augment",
            help="Flip (boxes swapped), scale and shift image and boxes together.",
        ),
    ) -> None:
        """Train the SI-joint localiser the MR pipeline uses; exports RUN_DIR/model.safetensors."""
        values = {k: v for k, v in locals().items() if k != "options"}
        from sijnode.training.localizer_study import run_localizer

        path = run_localizer(options(**values))
        typer.echo(f"wrote {path} and {path.parent / 'report.md'}")

    @app.command("evaluate")
    def evaluate(
        model: Path = typer.Argument(..., help="Checkpoint (CT or MR classifier)."),
        data: Path = _DATA,
        out: Path = typer.Option(..., "--out", help="Folder for report.md and plots."),
        localizer: Path | None = typer.Option(
            None, "--localizer", help="MR: localiser checkpoint (default: annotated boxes)."
        ),
        device: str = typer.Option("cpu", "--device", help=_HELP["--device"]),
    ) -> None:
        """Score a checkpoint on a labelled data set (the training report's tables and plots)."""
        from sijnode.training.evaluate import evaluate_checkpoint

        report = evaluate_checkpoint(model, data, out, device=device, localizer=localizer)
        typer.echo(f"wrote {report}")
