"""Stage 1 of CLIP-ReID: learn class-specific prompt tokens against a frozen CLIP.

Recipe (CLIP-ReID ``processor_clipreid_stage1.py``): image features are computed once by the frozen
image encoder (:func:`~reid_pipeline.training.extract.extract_features` of ``encode_image``, under the
training precision as CLIP-ReID does); each epoch visits a random permutation of all training images
in batches of 64 (the last batch may be smaller, never empty); the loss is
:func:`~reid_pipeline.training.supcon.stage1_loss` between the batch's image features and the text
features of its labels' prompts; Adam (lr 3.5e-4, weight decay 1e-4) updates the prompt tokens only,
with the learning rate set per epoch by :func:`~reid_pipeline.training.schedulers.warmup_cosine_lr`
(1-based epoch). Text features use the exact savings of :mod:`reid_pipeline.model.prompt`
(truncated context, each distinct label once, shared prefix).

The epochs run in the shared loop (:func:`~reid_pipeline.training.loop.run_training`): checkpoints
every ``checkpoint_every`` epochs, resume, torn-state detection, the non-finite-loss guard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reid_pipeline.device import DeviceSpec, resolve_device
from reid_pipeline.model.prompt import PromptLearner, TextEncoder, _text_dims, default_template, encode_labels
from reid_pipeline.storage import tensors_fingerprint
from reid_pipeline.training.loop import LoopResult, NonFiniteLossError, RankHooks, run_training
from reid_pipeline.training.schedulers import set_lr, warmup_cosine_lr
from reid_pipeline.training.supcon import average_positives, stage1_loss

__all__ = [
    "Stage1Error",
    "NonFiniteLossError",
    "Stage1Config",
    "Stage1Result",
    "train_prompts",
]

# Config fields that do not change the trajectory: they may differ between a run and its resume.
_RESUME_FREE_FIELDS = {"checkpoint_every"}


class Stage1Error(ValueError):
    """Inputs that do not fit stage 1 (labels, feature dims, CLIP)."""


class Stage1Config(BaseModel):
    """Stage-1 hyper-parameters; defaults are CLIP-ReID's ViT-B/16 recipe."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(120, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3.5e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(5, ge=0)
    warmup_lr_init: float = Field(1e-5, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    n_ctx: int = Field(4, ge=1)
    template: str | None = Field(None, description="None: 'A photo of a X X X X <subject>.' with n_ctx X's")
    subject: str = Field("person", description="'person' or 'vehicle' (used when template is None)")
    seed: int = 0
    checkpoint_every: int = Field(1, ge=1, description="epochs between resumable training-state saves")
    truncate_context: bool = Field(True, description="cut the text context at the end-of-text token (exact)")
    distinct_labels: bool = Field(True, description="encode each distinct label of a batch once (exact)")
    prefix_cache: bool = Field(True, description="compute the fixed prompt prefix once per batch (exact)")

    @classmethod
    def paper(cls, arch: str = "vit", **overrides: Any) -> "Stage1Config":
        """CLIP-ReID's stage-1 settings: 120 epochs for ViT-B/16 (``"vit"``), 60 for RN50 (``"resnet"``)."""
        epochs = {"vit": 120, "resnet": 60}
        if arch not in epochs:
            raise ValueError(f"arch must be 'vit' or 'resnet', got {arch!r}")
        return cls(**{"epochs": epochs[arch], **overrides})

    def resolved_template(self) -> str:
        """The template text actually used."""
        return self.template if self.template is not None else default_template(self.n_ctx, self.subject)


@dataclass
class Stage1Result(LoopResult):
    """:class:`~reid_pipeline.training.loop.LoopResult` plus the prompts (on the training device)."""

    prompt_learner: PromptLearner | None = None
    avg_positives: float = 0.0
    precision: str = "fp32"


def _validate(
    clip_model: nn.Module, image_features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> None:
    _, _, embed_dim = _text_dims(clip_model)
    if not isinstance(image_features, torch.Tensor) or image_features.dim() != 2:
        raise Stage1Error(f"image_features must be a 2-D (N, D) tensor, got {getattr(image_features, 'shape', image_features)}")
    if not image_features.dtype.is_floating_point:
        raise Stage1Error(f"image_features must be floating point, got {image_features.dtype}")
    if image_features.shape[0] == 0:
        raise Stage1Error("image_features is empty: stage 1 needs at least one training image")
    if image_features.shape[1] != embed_dim:
        raise Stage1Error(
            f"image feature dim {image_features.shape[1]} != the CLIP model's embed dim {embed_dim} "
            "(features from a different CLIP?)"
        )
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise Stage1Error(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)} "
                          f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if labels.shape[0] != image_features.shape[0]:
        raise Stage1Error(f"{labels.shape[0]} labels for {image_features.shape[0]} image features")
    if int(num_classes) < 1:
        raise Stage1Error(f"num_classes must be >= 1, got {num_classes}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise Stage1Error(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}; got values in [{lo}, {hi}]")
    if not torch.isfinite(image_features).all():
        raise Stage1Error("image_features holds non-finite values")


class _PromptStage:
    """Stage 1 as the shared loop sees it: one epoch = a permutation of all images in batches."""

    name = "stage 1"

    def __init__(self, clip_model: nn.Module, image_features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 config: Stage1Config, spec: DeviceSpec):
        self.config, self.spec, self.num_classes, self.epochs = config, spec, int(num_classes), config.epochs
        device = spec.device
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.generators = {"stage1": self.generator}
        self.prompt_learner = PromptLearner(
            num_classes, clip_model, config.n_ctx, config.resolved_template(),
            truncate=config.truncate_context, generator=self.generator,
        ).to(device)
        text_encoder = TextEncoder(clip_model)
        if text_encoder.positional_embedding.device != device:
            text_encoder = copy.deepcopy(text_encoder).to(device)  # leave the caller's model where it is
        self.text_encoder = text_encoder
        self.labels_cpu = labels.detach().to("cpu", torch.long).contiguous()
        features_cpu = image_features.detach().to("cpu", torch.float32).contiguous()
        self.data_fp = tensors_fingerprint({"image_features": features_cpu, "labels": self.labels_cpu})
        self.features, self.targets = features_cpu.to(device), self.labels_cpu.to(device)
        self.optimizer = torch.optim.Adam([self.prompt_learner.cls_ctx], lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = spec.grad_scaler()
        self.prefix_kv = None

    def identity(self) -> dict[str, Any]:
        config = {k: v for k, v in self.config.model_dump().items() if k not in _RESUME_FREE_FIELDS}
        return {"config": config, "data": self.data_fp, "num_classes": self.num_classes, "precision": self.spec.precision}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"cls_ctx": self.prompt_learner.cls_ctx.detach()}

    def load_state_tensors(self, tensors, source: str) -> None:
        ctx = tensors["cls_ctx"]
        if tuple(ctx.shape) != tuple(self.prompt_learner.cls_ctx.shape):
            raise Stage1Error(f"{source}: prompt tokens of shape {tuple(ctx.shape)}, expected "
                              f"{tuple(self.prompt_learner.cls_ctx.shape)} (classes, n_ctx, text width)")
        with torch.no_grad():
            self.prompt_learner.cls_ctx.copy_(ctx.to(self.prompt_learner.cls_ctx.device))

    def run_epoch(self, epoch: int, log: Callable[[str], None]) -> dict[str, float]:
        config, spec = self.config, self.spec
        if config.prefix_cache and self.prefix_kv is None:  # constant while CLIP is frozen: once per run
            with torch.no_grad(), spec.autocast():
                self.prefix_kv = self.text_encoder.prefix_states(self.prompt_learner.token_prefix)
        lr = warmup_cosine_lr(epoch, config.lr, config.epochs, config.warmup_epochs, config.warmup_lr_init, config.min_lr)
        set_lr(self.optimizer, lr)
        n = self.features.shape[0]
        perm = torch.randperm(n, generator=self.generator)
        perm_dev = perm.to(spec.device)
        step_losses: list[torch.Tensor] = []
        sizes: list[int] = []
        positives = 0.0
        for start in range(0, n, config.batch_size):  # the last batch is partial, never empty
            idx = perm_dev[start : start + config.batch_size]
            batch_labels = self.targets[idx]
            self.optimizer.zero_grad(set_to_none=True)
            with spec.autocast():
                text = encode_labels(
                    self.prompt_learner, self.text_encoder, batch_labels,
                    distinct=config.distinct_labels, prefix_cache=config.prefix_cache, prefix_kv=self.prefix_kv,
                )
            loss = stage1_loss(self.features[idx], text.float(), batch_labels)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step_losses.append(loss.detach())
            sizes.append(int(idx.numel()))
            positives += average_positives(self.labels_cpu[perm[start : start + config.batch_size]]) * idx.numel()
        losses = torch.stack(step_losses).double().cpu()
        bad = (~torch.isfinite(losses)).nonzero().flatten()
        if bad.numel():
            step = int(bad[0]) + 1
            raise NonFiniteLossError(
                f"stage 1: non-finite loss ({float(losses[bad[0]])}) at epoch {epoch}, step {step} of "
                f"{len(sizes)} (lr {lr:.3g}); check the image features and the learning rate",
                epoch=epoch, step=step, terms={"loss": float(losses[bad[0]])},
            )
        loss = float((losses * torch.tensor(sizes, dtype=torch.float64)).sum() / n)
        return {"loss": loss, "lr": float(lr), "samples": n, "steps": len(sizes), "avg_positives": positives / n}


def train_prompts(
    clip_model: nn.Module,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: Stage1Config | None = None,
    device_spec: DeviceSpec | None = None,
    state_path: str | Path | None = None,
    on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None,
    log: Callable[[str], None] | None = None,
    hooks: RankHooks | None = None,
) -> Stage1Result:
    """Learn the prompt tokens of ``num_classes`` identities from precomputed image features.

    Args:
        clip_model: a frozen openai-clip model; its text tower is used, its weights never change.
        image_features: (N, embed_dim), e.g. :func:`~reid_pipeline.training.extract.extract_features`
            of ``clip_model.encode_image``.
        labels: (N,) integer class indices in ``[0, num_classes)``.
        config: hyper-parameters (default: ``Stage1Config()``, the ViT-B/16 recipe).
        device_spec: where and in which precision to train (default: CPU, fp32).
        state_path, on_epoch_end, log, hooks: as in :func:`~reid_pipeline.training.loop.run_training`
            (the history rows carry ``avg_positives`` besides the common fields).

    Raises:
        Stage1Error: bad inputs. CheckpointError: a resume state written for another config or data,
        or torn. NonFiniteLossError: the loss became NaN/inf (names epoch and step).
    """
    config = config or Stage1Config()
    spec = device_spec or resolve_device("cpu", "fp32")
    _validate(clip_model, image_features, labels, num_classes)
    if state_path is not None and Path(state_path).suffix != ".safetensors":
        raise Stage1Error(f"state_path {state_path}: expected a file name ending in .safetensors")
    stage = _PromptStage(clip_model, image_features, labels, num_classes, config, spec)
    frozen_flags = [(p, p.requires_grad) for p in stage.text_encoder.parameters()]
    for p, _ in frozen_flags:
        p.requires_grad_(False)
    try:
        loop = run_training(stage, state_path=state_path, checkpoint_every=config.checkpoint_every,
                            on_epoch_end=on_epoch_end, log=log, log_terms=("avg_positives",), hooks=hooks)
    finally:
        for p, flag in frozen_flags:
            p.requires_grad_(flag)
    positives = [row["avg_positives"] for row in loop.history]
    return Stage1Result(**vars(loop), prompt_learner=stage.prompt_learner,
                        avg_positives=float(sum(positives) / max(len(positives), 1)), precision=spec.precision)
