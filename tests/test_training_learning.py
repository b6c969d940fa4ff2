"""Learning: quick CPU runs on synthetic subjects train a localiser and an MR model, and a
CT model; the checkpoints verify and load in the node's pipelines, and on held-out
synthetic studies (subjects never seen in training) the pipelines' ``predict`` gives a
subject (MR) and study (CT) ROC AUC of at least 0.95 (``sijnode.evaluation``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sijnode.evaluation import roc_auc
from sijnode.models.checkpoint import verify_checkpoint
from sijnode.synth import generate_dataset, write_dataset
from sijnode.training.evaluate import pipeline_scores

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _train(*args: str) -> None:
    from sijnode.cli import _register_parts, app

    _register_parts()
    result = CliRunner().invoke(app, ["train", *args, "--quick", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("learn")
    # Different seeds: the held-out subjects have their own anatomy and lesions.
    write_dataset(
        root / "train", generate_dataset(seed=21, n_subjects=16, positive_fraction=0.5, n_slices=8)
    )
    write_dataset(
        root / "test", generate_dataset(seed=97, n_subjects=8, positive_fraction=0.5, n_slices=8)
    )
    # CT: more subjects with fewer slices each (the network overfits 11 subjects).
    write_dataset(
        root / "ct-train",
        generate_dataset(seed=21, n_subjects=32, positive_fraction=0.5, modality="ct", n_slices=4),
    )
    return {"train": root / "train", "test": root / "test", "ct-train": root / "ct-train"}


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mr_localiser_and_classifier_learn(data: dict[str, Path], tmp_path: Path) -> None:
    train, test = data["train"], data["test"]
    _train("localizer", "--data", str(train), "--out", str(tmp_path / "loc"))
    _train(
        "mr",
        "--data",
        str(train),
        "--out",
        str(tmp_path / "mr"),
        "--folds",
        "1",
        "--no-compare",
        "--epochs",
        "8",
        "--size",
        "48",
        "--optimizer",
        "adam",
    )
    loc = verify_checkpoint(tmp_path / "loc/model.safetensors", "si_joint_localizer")
    mr = verify_checkpoint(tmp_path / "mr/model.safetensors", "mr_roi_classifier")
    assert mr.operating_points.chosen_by.startswith("slice: Youden")
    assert loc.training["test"]["iou"] > 0.3
    labels, scores, _ = pipeline_scores(
        "mr",
        {
            "model": tmp_path / "mr/model.safetensors",
            "localizer": tmp_path / "loc/model.safetensors",
        },
        test,
    )
    assert roc_auc(np.asarray(labels, bool), scores) >= 0.95, (labels, scores)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ct_classifier_learns(data: dict[str, Path], tmp_path: Path) -> None:
    train, test = data["ct-train"], data["test"]
    _train(
        "ct",
        "--data",
        str(train),
        "--out",
        str(tmp_path / "ct"),
        "--folds",
        "1",
        "--epochs",
        "8",
        "--size",
        "96",
    )
    spec = verify_checkpoint(tmp_path / "ct/model.safetensors", "ct_slice_classifier")
    assert spec.preprocessing.whitening is not None  # type: ignore[union-attr]
    labels, scores, _ = pipeline_scores("ct", {"model": tmp_path / "ct/model.safetensors"}, test)
    assert roc_auc(np.asarray(labels, bool), scores) >= 0.95, (labels, scores)
