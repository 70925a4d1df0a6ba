"""Settings and the parameter models of the flows.

Why pydantic: the same models validate CLI arguments, Prefect deployment parameters (the UI
renders a form from them) and library calls, so a bad value fails at the door with a message
naming the field. Settings are read from the environment when asked for, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PASCAL_2007_URL = "https://s3.amazonaws.com/fast-ai-imagelocal/pascal_2007.tgz"
# How far (absolute) a candidate must beat guessing to be promoted. Why 0.02: issue 17 saw a
# model at mAP 0.852 against a 0.845 prevalence baseline become champion; a gap inside the
# noise of a few hundred validation images is not evidence the model looks at the image.
BASELINE_MARGIN = 0.02


def default_home() -> str:
    """MULTITAG_HOME, else ~/.multitag: a local path or an fsspec URL such as s3://bucket/prefix."""
    env = os.environ.get("MULTITAG_HOME")
    if env:
        return env
    return str(Path.home() / ".multitag")


class Settings(BaseModel):
    """Where everything lives; built from the environment by `get_settings()`."""

    model_config = ConfigDict(frozen=True)

    home: str = Field(
        description="Storage root (local path or s3://...) for datasets, models, tags."
    )

    @property
    def datasets(self) -> str:
        from multitag.storage import join

        return join(self.home, "datasets")

    @property
    def models(self) -> str:
        from multitag.storage import join

        return join(self.home, "models")

    @property
    def tags(self) -> str:
        from multitag.storage import join

        return join(self.home, "tags")


def get_settings(home: str | None = None) -> Settings:
    return Settings(home=home or default_home())


class TrainParams(BaseModel):
    """How to train one model. Defaults suit real photos (PASCAL); the shapes demo overrides."""

    model_config = ConfigDict(extra="forbid")

    arch: str = Field(
        "resnet34",
        description="torchvision name (resnet18/34/50...), a timm name, "
        "or 'shapes_cnn' (small full-resolution CNN for the synthetic dataset).",
    )
    pretrained: bool = Field(
        True, description="Start from ImageNet weights (must be on disk offline)."
    )
    img_size: int = Field(224, ge=16, le=1024)
    batch_size: int = Field(64, ge=1, le=4096)
    epochs: int = Field(5, ge=1, le=1000)
    freeze_epochs: int = Field(
        1, ge=0, le=100, description="Head-only epochs before unfreezing (pretrained models only)."
    )
    lr: float | None = Field(3e-3, gt=0, description="Peak learning rate; None runs lr_find.")
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_valid_images: int | None = Field(None, ge=1, description="Cap validation size (speed).")
    augment: Literal["none", "dihedral", "standard"] = Field(
        "standard",
        description="'standard': fastai aug_transforms (flip, small rotation, zoom, lighting) "
        "for photos; 'dihedral': the 8 flips/quarter turns, for images without an up "
        "(the shapes); 'none'.",
    )
    head_dropout: float = Field(0.5, ge=0, lt=1, description="Dropout of fastai's head (`ps`).")
    num_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader workers; None: "
        "0 on CPU (measured faster on 2 cores), up to 8 on CUDA.",
    )


def shapes_train_params(**overrides: object) -> TrainParams:
    """Demo defaults for the synthetic shapes dataset: small CNN (`shapes_cnn`), random init.

    Measured on 2 shared CPU cores (default dataset: 4,800 train / 1,200 valid at 64 px); see
    benchmarks/RESULTS.md. resnet18 from random init never leaves the no-label baseline here.
    Dihedral augmentation is safe because no shape class depends on orientation.
    """
    defaults: dict[str, object] = {
        "arch": "shapes_cnn",
        "pretrained": False,
        "img_size": 64,
        "batch_size": 64,
        "epochs": 12,
        "lr": 3e-3,
        "augment": "dihedral",
        "head_dropout": 0.1,
    }
    return TrainParams.model_validate({**defaults, **overrides})


class ThresholdParams(BaseModel):
    """How per-label thresholds are chosen on validation data (multitag.training.thresholds).

    Objectives: `f1` / `accuracy` maximise that metric (globally: micro-F1 / accuracy_multi);
    `recall_at_precision` takes the lowest threshold whose precision meets `precision_target`;
    `precision_at_recall` takes the most precise threshold whose recall meets `recall_target`.
    Policies: `global` one threshold for all labels; `per_label` each label's own optimum;
    `shrunk` (default) moves each label from the global value toward its own optimum only as
    far as repeated random half-splits of the validation set show it helps on held-out rows.
    """

    model_config = ConfigDict(extra="forbid")

    objective: Literal["f1", "accuracy", "precision_at_recall", "recall_at_precision"] = "f1"
    policy: Literal["global", "per_label", "shrunk"] = "shrunk"
    min_positives: int = Field(
        20, ge=1, description="Labels with fewer validation positives use the global threshold."
    )
    precision_target: float = Field(0.9, gt=0, le=1, description="For recall_at_precision.")
    recall_target: float = Field(0.9, gt=0, le=1, description="For precision_at_recall.")
    n_resamples: int = Field(
        50,
        ge=1,
        le=1000,
        description="Random half-splits of the "
        "validation set the `shrunk` policy scores each label on.",
    )
    seed: int = Field(0, description="Seed of those half-splits: same inputs, same thresholds.")


class RetrainParams(BaseModel):
    """Parameters of the retrain flow (and `multitag retrain`)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(
        PASCAL_2007_URL,
        description="Dataset archive URL, local archive, or folder "
        "in the PASCAL_2007 layout (train/, train.csv); any fsspec URL works too "
        "(s3://bucket/prefix/ folder or archive), pulled into the local cache by content.",
    )
    data_sha256: str | None = Field(
        None,
        pattern=r"^[0-9A-Fa-f]{64}$",
        description="sha256 of the dataset archive, checked before it is extracted.",
    )
    retrain_unchanged: bool = Field(
        False,
        description="Train even when a registered version was already trained on the same "
        "dataset content with the same training and threshold parameters (by default such a "
        "run says 'no new data' and returns that version without training).",
    )
    train: TrainParams = Field(default_factory=TrainParams)
    thresholds: ThresholdParams = Field(default_factory=ThresholdParams)
    promote_metric: Literal["mAP", "accuracy_multi", "f1_micro", "f1_macro"] = "mAP"
    force_promote: bool = False
    baseline_margin: float = Field(
        BASELINE_MARGIN,
        ge=0.0,
        le=1.0,
        description="A candidate is promoted only if its promote_metric beats the label-prior "
        "baseline on validation (prevalence-score mAP, all-negative accuracy_multi, "
        "all-positive F1) by more than this, absolute; --force-promote overrides.",
    )
    home: str | None = Field(None, description="Storage root; default MULTITAG_HOME.")
    fastpath_check_images: int = Field(
        1000,
        ge=0,
        description="Validation images on which the CPU fast path (ONNX fp32/int8, bf16) is "
        "checked against fp32 at export and recorded with the model; 0: no fast path "
        "(tagging then checks one on its own images).",
    )
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Model name the new version is registered under (its champion is chosen "
        "among that name's versions only, of the same vocabulary); default the dataset's name.",
    )

    @field_validator("model_name")
    @classmethod
    def _plain_model_name(cls, value: str | None) -> str | None:
        # A name becomes a registry folder (models/_champion/<name>/) beside its .json files.
        if value is not None and (".." in value or value.endswith(".json")):
            raise ValueError(f"model_name {value!r} must not contain '..' nor end in '.json'")
        return value


class TagParams(BaseModel):
    """Parameters of the tag flow (and `multitag tag`)."""

    model_config = ConfigDict(extra="forbid")

    @property
    def on_dask(self) -> bool:
        """Shards go to Dask (a scheduler, or a local cluster) instead of this process."""
        return bool(self.dask_address or self.dask_local_workers)

    def with_home_resolved(self) -> TagParams:
        """These params with `home` made explicit (MULTITAG_HOME or the default when unset).

        Why: the flow's tasks (on Dask workers too) then all use one home, and the CLI's
        prefetch keys the cached tagger and its head start's rows by the home the flow uses.
        """
        return self.model_copy(update={"home": get_settings(self.home).home})

    @field_validator("source", "out")
    @classmethod
    def _no_unfilled_template(cls, value: str | None) -> str | None:
        """A deployment created without its env vars stores the literal `{{ $VAR }}`."""
        if value and "{{" in value:
            raise ValueError(
                f"{value!r} is an unfilled template: export the variable it names "
                "(e.g. MULTITAG_TAG_SOURCE) before `prefect deploy`, or pass the parameter"
            )
        return value

    source: str = Field(
        description="Folder or prefix of images: /path, file://, s3://bucket/prefix."
    )
    out: str | None = Field(
        None, description="Output root for Parquet; default MULTITAG_HOME/tags."
    )
    dataset_name: str | None = Field(None, description="Name under out/; default from the source.")
    model: str | None = Field(
        None,
        description="Model to tag with: VERSION, NAME (that model name's champion) or "
        "NAME@VERSION; default the champion, when exactly one model name has one.",
    )
    batch_size: int = Field(64, ge=1, le=4096)
    shard_size: int = Field(
        1000, ge=1, le=1_000_000, description="Images per Parquet shard (one task each)."
    )
    precision: Literal["auto", "fp32", "bf16", "int8"] = Field(
        "auto",
        description="auto: the fastest scorer checked at export; fp32: exact (fp32 scores of "
        "fastai's full-resolution pixels); bf16; int8 (even below the agreement bar).",
    )
    max_concurrency: int = Field(
        1, ge=1, le=256, description="Shards tagged at once on this machine."
    )
    shard_timeout_s: float = Field(
        3600,
        gt=0,
        description="A shard task running longer fails (and is retried): one hung read "
        "cannot stall a run. Generous: a 1,000-photo shard takes ~10-100 s.",
    )
    shard_retry_delays_s: list[float] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0],
        max_length=20,
        description="Waits before each retry of a shard that failed for weather (network, "
        "credentials, throttling); one retry per entry, with jitter. Throttling and 5xx clear "
        "in seconds, a refreshed credential in minutes. [] never retries.",
    )
    dask_address: str | None = Field(None, description="Dask scheduler to fan shards out to.")
    dask_local_workers: int | None = Field(
        None, ge=1, le=256, description="Start a local Dask cluster."
    )
    home: str | None = Field(None, description="Registry root; default MULTITAG_HOME.")
    retry_errors: bool = Field(
        False,
        description="Tag again the images whose latest row is an error (after fixing a "
        "cause: permissions, a restored object); the new rows supersede them (`attempt`).",
    )
    single_writer: bool = Field(
        False,
        description="Run on a store that ignores conditional writes (If-None-Match): only "
        "one run at a time may write this output; exactly once then relies on that.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    decode_workers: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Threads reading and "
        "decoding the next batches while the model runs; None: "
        "CPUs - 1, at least 2, at most 8.",
    )
    max_pixels: int | None = Field(
        89_478_485,
        ge=1,
        description="Images declaring more pixels "
        "become error rows (decompression-bomb guard); None: "
        "Pillow's own global limit only.",
    )
    max_bytes: int | None = Field(
        100 * 2**20,  # = multitag.inference.reading.DEFAULT_MAX_BYTES (camera photos are 3-40 MB)
        ge=1,
        description="Files larger than this many bytes become 'too_large' error rows, "
        "decided from their size without reading them; None: no cap.",
    )
    min_precision: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Operating point: per label, the lowest threshold whose validation "
        "precision (curves stored with the model) is >= this; default: training's thresholds.",
    )
    thresholds_file: str | None = Field(
        None,
        description='Operating point: a JSON file of per-label thresholds, {"label": value} '
        "or a thresholds.json, with exactly the model's labels.",
    )

    @model_validator(mode="after")
    def _one_operating_point(self) -> TagParams:
        if self.min_precision is not None and self.thresholds_file is not None:
            raise ValueError("min_precision and thresholds_file are mutually exclusive")
        return self


class DemoParams(BaseModel):
    """Parameters of the offline demo flow: generate shapes, retrain, tag the test folder."""

    model_config = ConfigDict(extra="forbid")

    # 6,000 is what the shapes recipe needs to reach accuracy_multi >= 0.99 in 12 epochs
    # (2,000 stalls near 0.87); see benchmarks/RESULTS.md.
    n_images: int = Field(6000, ge=50, le=200_000, description="Labelled images (train + valid).")
    n_test: int = Field(1000, ge=10, le=100_000, description="Held-out test images to tag.")
    epochs: int | None = Field(None, ge=1, le=200, description="Default: the shapes recipe's.")
    seed: int = 0
    home: str | None = Field(None, description="Storage root; default MULTITAG_HOME.")
