"""The model spec: one frozen, validated object per checkpoint (torchvision's ``Weights``).

A spec bundles everything that decides a model's output besides its weights: task,
architecture and input size, memory format and precision, every preprocessing parameter,
the operating points and how they were chosen, the aggregation rule, class meanings, the
training summary and the weights hash. ``spec.version`` hashes the canonical JSON of all of
it, so a new threshold is a new version (and a new job key). Imports neither torch nor
``db/``: the listener reads specs from checkpoint headers (``checkpoint.read_spec``).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["ct_slice_classifier", "mr_roi_classifier", "si_joint_localizer"]

#: Short task names used in versions ("ct-0123456789ab").
SHORT_TASK: dict[str, str] = {
    "ct_slice_classifier": "ct",
    "mr_roi_classifier": "mr",
    "si_joint_localizer": "loc",
}

#: Architectures ``models/architectures.py`` builds, and the task each one serves.
ARCHITECTURE_TASKS: dict[str, tuple[str, ...]] = {
    # Fu et al. 2024: ResNeXt-50 32x4d, linear head with one logit.
    "resnext50_32x4d": ("ct_slice_classifier",),
    # Lee et al. 2021: ResNet18, one hidden fully connected layer, sigmoid output.
    "resnet18_hidden_head": ("mr_roi_classifier",),
    # Lee et al. 2021's comparison: ResNet50 with the same head (``train mr --compare``).
    "resnet50_hidden_head": ("mr_roi_classifier",),
    # SI-joint localiser: small CNN regressing two boxes (docs/models.md).
    "localizer_cnn_v1": ("si_joint_localizer",),
    # Fu et al. 2024's comparison networks (``sijnode train ct --compare``), linear 1-logit
    # heads; the node's CT pipeline explains ResNet-family networks only (docs/training.md).
    "vgg16": ("ct_slice_classifier",),
    "resnet101": ("ct_slice_classifier",),
    "densenet121": ("ct_slice_classifier",),
    "inception_v4": ("ct_slice_classifier",),
}

#: ImageNet statistics (the papers fine-tune ImageNet-pretrained networks).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Whitening(_Frozen):
    """ZCA whitening fitted at training (Fu et al. 2024, "PCA and whitening", vague).

    Whitening of whole 224² images needs a 50176² matrix; sijnode fits ZCA on
    ``patch``×``patch`` neighbourhoods of the preprocessed grayscale image and applies it as
    a convolution with the row of the ZCA matrix that belongs to the patch centre, i.e. each
    pixel becomes the whitened value of its own neighbourhood. PCA whitening rotated back to
    pixel space is ZCA, which is why only ZCA gives an image a CNN can read.
    """

    kind: Literal["zca"] = "zca"
    patch: int = Field(..., ge=1, le=15)
    #: Mean of the patch vectors (one value per patch pixel, row-major).
    mean: tuple[float, ...]
    #: ZCA matrix, ``patch²`` rows of ``patch²`` values.
    matrix: tuple[tuple[float, ...], ...]

    @model_validator(mode="after")
    def _shapes(self) -> Whitening:
        n = self.patch * self.patch
        if self.patch % 2 != 1:
            raise ValueError(f"whitening.patch must be odd, got {self.patch}")
        if len(self.mean) != n or len(self.matrix) != n or any(len(r) != n for r in self.matrix):
            raise ValueError(f"whitening.mean and each matrix row need {n} values (patch²)")
        return self


class CTPreprocessing(_Frozen):
    """CT slice preprocessing (Fu et al. 2024, Methods), in the order applied."""

    kind: Literal["ct"] = "ct"
    #: Window on Hounsfield units (from RescaleSlope/Intercept); bone window by default.
    window_center: float = 400.0
    window_width: float = Field(1800.0, gt=0)
    #: OpenCV CLAHE on the windowed 8-bit image; clip_limit 0 disables it.
    clahe_clip_limit: float = Field(2.0, ge=0)
    clahe_tile_grid: tuple[int, int] = (8, 8)
    #: Crop to the body before resizing (the paper's "standardise size", sijnode's reading):
    #: the bounding box of the largest region above ``body_threshold_hu`` after an opening
    #: that drops the table; the whole slice where none is found. Off in older checkpoints.
    body_crop: bool = False
    body_threshold_hu: float = -400.0
    #: Resize to the input size keeping the aspect ratio, padding the rest.
    resize: Literal["keep_aspect_pad"] = "keep_aspect_pad"
    #: Pad value in [0, 1] (after windowing, before normalisation).
    pad_value: float = Field(0.0, ge=0, le=1)
    whitening: Whitening | None = None
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @model_validator(mode="after")
    def _norm(self) -> CTPreprocessing:
        _check_norm(self.channels, self.mean, self.std)
        return self


class NoiseStep(_Frozen):
    """The MR paper's noise step (Lee et al. 2021 §2.3): applied at train and test time.

    Gaussian noise of mean 0 and variance ``gaussian_variance``, plus Poisson noise with
    expected value ``(ln pixel)^poisson_log_power`` on the stored pixel values. With
    ``poisson_centred`` the Poisson draw minus its expectation is added (brightness kept);
    seeded from the study at inference so one study always gives one answer.
    """

    enabled: bool = False
    gaussian_variance: float = Field(0.3, ge=0)
    poisson_log_power: float = Field(4.0, ge=0)
    poisson_centred: bool = True


class MRPreprocessing(_Frozen):
    """MR ROI patch preprocessing (Lee et al. 2021 §2.2)."""

    kind: Literal["mr"] = "mr"
    #: Each iliac box moves toward the sacrum by roi_shift × its width.
    roi_shift: float = Field(0.8, ge=0, le=2)
    #: The joined patch is resized to patch_size × patch_size (= the input size).
    patch_size: int = Field(224, ge=16)
    #: Intensity scaling of the slice to [0, 1]: percentiles of its pixel values.
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    noise: NoiseStep = NoiseStep()
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @model_validator(mode="after")
    def _norm(self) -> MRPreprocessing:
        _check_norm(self.channels, self.mean, self.std)
        _check_percentiles(self.intensity_percentiles)
        return self


class LocalizerPreprocessing(_Frozen):
    """SI-joint localiser input and the plausibility rules for its boxes (docs/models.md)."""

    kind: Literal["localizer"] = "localizer"
    intensity_percentiles: tuple[float, float] = (0.5, 99.5)
    resize: Literal["keep_aspect_pad"] = "keep_aspect_pad"
    channels: Literal[1] = 1
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    #: A box narrower or lower than this fraction of the image side is implausible.
    min_box_fraction: float = Field(0.02, gt=0, lt=1)
    #: A box wider or higher than this fraction of the image side is implausible.
    max_box_fraction: float = Field(0.6, gt=0, le=1)
    #: Boxes overlapping more than this intersection-over-union are implausible.
    max_iou: float = Field(0.3, ge=0, le=1)
    #: Fewer plausible slices than this: the series has no plausible joint (Indeterminate).
    min_plausible_slices: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _norm(self) -> LocalizerPreprocessing:
        _check_norm(self.channels, self.mean, self.std)
        _check_percentiles(self.intensity_percentiles)
        if self.min_box_fraction >= self.max_box_fraction:
            raise ValueError("min_box_fraction must be below max_box_fraction")
        return self


Preprocessing = Annotated[
    CTPreprocessing | MRPreprocessing | LocalizerPreprocessing, Field(discriminator="kind")
]

_KIND_OF_TASK = {
    "ct_slice_classifier": "ct",
    "mr_roi_classifier": "mr",
    "si_joint_localizer": "localizer",
}


class OperatingPoints(_Frozen):
    """Thresholds and where they come from (a recorded operating point, PROTOCOLS.md C)."""

    #: Slice probability at or above which a slice is positive.
    slice_threshold: float | None = Field(None, ge=0, le=1)
    #: CT: the aggregated study score at or above which the study is positive.
    study_threshold: float | None = Field(None, ge=0, le=1)
    #: MR: the mean filtered slice decision at or above which the subject is positive.
    subject_threshold: float | None = Field(None, ge=0, le=1)
    #: How the thresholds were chosen (e.g. "Youden index on validation ROC").
    chosen_by: str = "unspecified"
    #: On which data (e.g. "synthetic seed 7, 40 subjects, validation split").
    data: str = "unspecified"


class Aggregation(_Frozen):
    """How slice results become a study or subject decision (docs/models.md)."""

    #: ``median_topk_mean`` (CT): size-``median_size`` median filter of the ordered slice
    #: probabilities, then the mean of the ``top_k`` highest, against the study threshold.
    #: ``median_decisions_mean`` (MR, Lee et al. 2021 §2.4): slice decisions at the slice
    #: threshold, size-``median_size`` median filter lower→upper, mean of the filtered
    #: decisions against the subject threshold. ``none``: the localiser.
    rule: Literal["median_topk_mean", "median_decisions_mean", "none"]
    median_size: int = Field(3, ge=1)
    top_k: int = Field(3, ge=1)

    @field_validator("median_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 != 1:
            raise ValueError(f"median_size must be odd, got {value}")
        return value


class ModelSpec(_Frozen):
    """Everything about one model checkpoint except its weights."""

    schema_version: Literal[1] = 1
    task: Task
    name: str = Field(..., min_length=1, max_length=64)
    architecture: str
    #: Network input (height, width) in pixels.
    input_size: tuple[int, int]
    memory_format: Literal["channels_last", "contiguous"] = "channels_last"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    preprocessing: Preprocessing
    operating_points: OperatingPoints = OperatingPoints()
    aggregation: Aggregation
    #: Meaning of each output (e.g. {"0": "absent", "1": "sacroiliitis"}).
    classes: dict[str, str]
    #: Training summary and metrics (free form, JSON-serialisable).
    training: dict[str, Any] = Field(default_factory=dict)
    #: SHA-256 of the safetensors data section (set by ``save_checkpoint``).
    weights_sha256: str = ""

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURE_TASKS:
            raise ValueError(
                f"unknown architecture {value!r}: expected one of {sorted(ARCHITECTURE_TASKS)}"
            )
        return value

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(32 <= v <= 2048 for v in value):
            raise ValueError(f"input_size must be within 32-2048 pixels, got {value}")
        return value

    @field_validator("weights_sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
            raise ValueError(f"weights_sha256 must be 64 lowercase hex digits, got {value!r}")
        return value

    @field_validator("training")
    @classmethod
    def _json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"training must be JSON-serialisable: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.task not in ARCHITECTURE_TASKS[self.architecture]:
            raise ValueError(
                f"architecture {self.architecture!r} serves "
                f"{ARCHITECTURE_TASKS[self.architecture]}, not task {self.task!r}"
            )
        kind = _KIND_OF_TASK[self.task]
        if self.preprocessing.kind != kind:
            raise ValueError(
                f"task {self.task!r} needs preprocessing kind {kind!r}, "
                f"got {self.preprocessing.kind!r}"
            )
        ops = self.operating_points
        if self.task == "ct_slice_classifier":
            _need(ops.slice_threshold, "operating_points.slice_threshold", self.task)
            _need(ops.study_threshold, "operating_points.study_threshold", self.task)
            if self.aggregation.rule != "median_topk_mean":
                raise ValueError("a CT slice classifier aggregates with 'median_topk_mean'")
        elif self.task == "mr_roi_classifier":
            _need(ops.slice_threshold, "operating_points.slice_threshold", self.task)
            _need(ops.subject_threshold, "operating_points.subject_threshold", self.task)
            if self.aggregation.rule != "median_decisions_mean":
                raise ValueError("an MR ROI classifier aggregates with 'median_decisions_mean'")
            assert isinstance(self.preprocessing, MRPreprocessing)
            size = self.preprocessing.patch_size
            if self.input_size != (size, size):
                raise ValueError(
                    f"MR input_size must equal (patch_size, patch_size) = {(size, size)}, "
                    f"got {self.input_size}"
                )
        elif self.aggregation.rule != "none":
            raise ValueError("a localiser has aggregation rule 'none'")
        return self

    # -- identity ------------------------------------------------------------------------

    def canonical_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): what the version hashes."""
        return json.dumps(
            self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), allow_nan=False
        )

    @property
    def short_task(self) -> str:
        """``ct``, ``mr`` or ``loc``."""
        return SHORT_TASK[self.task]

    @property
    def version(self) -> str:
        """``{short_task}-{sha256(canonical spec JSON incl. weights hash)[:12]}``."""
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()
        return f"{self.short_task}-{digest[:12]}"

    def with_weights(self, weights_sha256: str) -> ModelSpec:
        """A copy with ``weights_sha256`` set (validated)."""
        return ModelSpec.model_validate(
            {**self.model_dump(mode="json"), "weights_sha256": weights_sha256}
        )

    def with_thresholds(self, **thresholds: float) -> ModelSpec:
        """A copy with new operating points (a new version)."""
        ops = {**self.operating_points.model_dump(mode="json"), **thresholds}
        return ModelSpec.model_validate({**self.model_dump(mode="json"), "operating_points": ops})


def _need(value: float | None, name: str, task: str) -> None:
    if value is None:
        raise ValueError(f"{name} is required for task {task!r}")


def _check_norm(channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (channels), got {mean} / {std}")
    if any(not math.isfinite(s) or s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {std}")


def _check_percentiles(value: tuple[float, float]) -> None:
    low, high = value
    if not 0 <= low < high <= 100:
        raise ValueError(f"intensity_percentiles must satisfy 0 <= low < high <= 100, got {value}")


# -- default specs (the papers' settings; thresholds to be replaced by training) -----------

_UNTRAINED = OperatingPoints(
    slice_threshold=0.5,
    study_threshold=0.5,
    subject_threshold=0.5,
    chosen_by="default 0.5 (untrained weights)",
    data="none",
)


def ct_spec(name: str = "ct-resnext50", size: int = 224, **fields: Any) -> ModelSpec:
    """A CT slice classifier spec with the defaults of Fu et al. 2024 (ResNeXt-50 32x4d)."""
    values: dict[str, Any] = {
        "task": "ct_slice_classifier",
        "name": name,
        "architecture": "resnext50_32x4d",
        "input_size": (size, size),
        "preprocessing": CTPreprocessing(),
        "operating_points": _UNTRAINED.model_copy(update={"subject_threshold": None}),
        "aggregation": Aggregation(rule="median_topk_mean", median_size=3, top_k=3),
        "classes": {"0": "absent", "1": "sacroiliitis"},
    }
    return ModelSpec.model_validate({**values, **fields})


def mr_spec(name: str = "mr-resnet18", size: int = 224, **fields: Any) -> ModelSpec:
    """An MR ROI classifier spec with the defaults of Lee et al. 2021 (ResNet18, ROI 224)."""
    values: dict[str, Any] = {
        "task": "mr_roi_classifier",
        "name": name,
        "architecture": "resnet18_hidden_head",
        "input_size": (size, size),
        "preprocessing": MRPreprocessing(patch_size=size),
        "operating_points": _UNTRAINED.model_copy(update={"study_threshold": None}),
        "aggregation": Aggregation(rule="median_decisions_mean", median_size=3),
        "classes": {"0": "absent", "1": "bone_marrow_oedema"},
    }
    return ModelSpec.model_validate({**values, **fields})


def localizer_spec(name: str = "sij-localizer", size: int = 128, **fields: Any) -> ModelSpec:
    """An SI-joint localiser spec (two iliac boxes per MR slice)."""
    values: dict[str, Any] = {
        "task": "si_joint_localizer",
        "name": name,
        "architecture": "localizer_cnn_v1",
        "input_size": (size, size),
        "preprocessing": LocalizerPreprocessing(),
        "operating_points": OperatingPoints(chosen_by="not applicable", data="none"),
        "aggregation": Aggregation(rule="none"),
        "classes": {"box0": "iliac bone, image left", "box1": "iliac bone, image right"},
    }
    return ModelSpec.model_validate({**values, **fields})
