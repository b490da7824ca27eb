"""Typed descriptors of what each pipeline step wrote: one pydantic model per artefact.

A descriptor is a small JSON file (``descriptor.json``) in the artefact's own folder that says where
its tensors are and what they were made from. The Dagster IO manager passes descriptors between
assets; a notebook, the ``torchrun`` entry point or ``reid-search`` read the same files with
:func:`load_descriptor` — no Dagster needed, nothing pickled.

Every descriptor has ``kind`` (which model validates it) and ``artifact_dir``. Unknown fields are
refused, so a descriptor written by other code fails loudly instead of being half-read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from reid_pipeline.storage import CheckpointError, read_json, write_json

__all__ = [
    "DESCRIPTOR_FILE",
    "Artifact",
    "ClipRef",
    "ManifestArtifact",
    "FrozenClipArtifact",
    "PromptArtifact",
    "EncoderArtifact",
    "FeaturesArtifact",
    "MetricsArtifact",
    "GalleryIndexArtifact",
    "OnnxArtifact",
    "CrossDomainArtifact",
    "AnyArtifact",
    "load_descriptor",
    "validation_problems",
]

DESCRIPTOR_FILE = "descriptor.json"


class Artifact(BaseModel):
    """Base of every descriptor: the folder the artefact lives in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    artifact_dir: str

    @property
    def folder(self) -> Path:
        return Path(self.artifact_dir)

    @property
    def descriptor_path(self) -> Path:
        return self.folder / DESCRIPTOR_FILE

    def save(self) -> Path:
        """Write ``descriptor.json`` into ``artifact_dir`` (atomically)."""
        return write_json(self.descriptor_path, self.model_dump(mode="json"))


class ClipRef(BaseModel):
    """Which CLIP, adapted how: enough to reload it and to refuse other weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="model name or absolute path given to clip.load")
    name: str
    sha256: str
    arch: Literal["vit", "resnet"]
    input_size: tuple[int, int]
    stride: Optional[int] = None
    version: str = Field(description="data version of frozen_clip: weights + input size + stride")


class ManifestArtifact(Artifact):
    kind: Literal["dataset_manifest"] = "dataset_manifest"
    manifest: str
    root: str
    layout: str
    dataset: Optional[str] = Field(default=None, description="the dataset's name (its partition key)")
    fingerprint: str
    num_classes: int
    label_to_pid: list[int]
    num_cameras: int

    def folder_path(self, rel: str | os.PathLike) -> Path:
        """An image of the manifest (its ``path`` column is relative to the dataset root)."""
        return Path(self.root) / rel


class FrozenClipArtifact(Artifact):
    kind: Literal["frozen_clip"] = "frozen_clip"
    clip: ClipRef


class PromptArtifact(Artifact):
    kind: Literal["prompt_checkpoint"] = "prompt_checkpoint"
    tokens: str
    num_classes: int
    label_to_pid: list[int]
    template: str
    n_ctx: int
    clip: ClipRef
    manifest_fingerprint: str
    precision: str


class EncoderArtifact(Artifact):
    kind: Literal["visual_encoder"] = "visual_encoder"
    weights: str
    num_classes: int
    label_to_pid: list[int]
    sie_camera: bool
    clip: ClipRef
    manifest_fingerprint: str
    prompt_tokens: str
    precision: str


class FeaturesArtifact(Artifact):
    kind: Literal["reid_features"] = "reid_features"
    features: str
    root: str
    encoder_weights: str
    precision: str


class MetricsArtifact(Artifact):
    kind: Literal["evaluation_metrics"] = "evaluation_metrics"
    metrics_file: str
    metrics: dict[str, float]
    features: str


class GalleryIndexArtifact(Artifact):
    kind: Literal["gallery_index"] = "gallery_index"
    index_dir: str = Field(description="what GalleryIndex.load / reid-search query --index read")
    count: int
    source: str = Field(description="the folder or split the gallery was built from")
    encoder_weights: str
    encoder_fingerprint: str


class OnnxArtifact(Artifact):
    kind: Literal["onnx_encoder"] = "onnx_encoder"
    onnx: str
    opset: int
    encoder_weights: str
    max_abs_diff: float
    topk_identical: bool


class CrossDomainArtifact(Artifact):
    kind: Literal["cross_domain_metrics"] = "cross_domain_metrics"
    matrix_file: str
    train_datasets: list[str] = Field(description="rows: the datasets an encoder was trained on")
    test_datasets: list[str] = Field(description="columns: the datasets evaluated on (query × gallery)")
    mAP: list[list[float]]
    rank1: list[list[float]]
    encoder_weights: dict[str, str]


AnyArtifact = Union[
    ManifestArtifact, FrozenClipArtifact, PromptArtifact, EncoderArtifact, FeaturesArtifact, MetricsArtifact,
    GalleryIndexArtifact, OnnxArtifact, CrossDomainArtifact,
]
_KINDS = {m.model_fields["kind"].default: m for m in AnyArtifact.__args__}  # type: ignore[attr-defined]


def validation_problems(exc: ValidationError, limit: int = 5) -> str:
    """A pydantic validation error as one line: ``field.path: message; …``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:limit])


def load_descriptor(path: str | os.PathLike, expected: type[Artifact] | None = None) -> Artifact:
    """Read a ``descriptor.json`` (or the artefact folder holding one) and validate it.

    Raises:
        CheckpointError: the file is missing, is not JSON, names an unknown kind, is not the
            ``expected`` kind, or does not fit its model (the message names the file and fields).
    """
    path = Path(path)
    if path.is_dir():
        path = path / DESCRIPTOR_FILE
    data = read_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    model = _KINDS.get(kind)
    if model is None:
        raise CheckpointError(f"{path}: not a reid_pipeline descriptor (kind {kind!r}; expected one of {sorted(_KINDS)})")
    if expected is not None and model is not expected:
        want = expected.model_fields["kind"].default
        raise CheckpointError(f"{path}: descriptor of a {kind} artefact, expected {want}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: invalid {kind} descriptor ({validation_problems(exc)})") from None
