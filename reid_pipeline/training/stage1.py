"""Stage 1 of CLIP-ReID: learn class-specific prompt tokens against a frozen CLIP.

Recipe (CLIP-ReID ``processor_clipreid_stage1.py``): image features are computed once by the frozen
image encoder (:func:`compute_image_features`); each epoch visits a random permutation of all
training images in batches of 64 (the last batch may be smaller, never empty); the loss is
:func:`~reid_pipeline.training.supcon.stage1_loss` between the batch's image features and the text
features of its labels' prompts; Adam (lr 3.5e-4, weight decay 1e-4) updates the prompt tokens only,
with the learning rate set per epoch by :func:`~reid_pipeline.training.schedulers.warmup_cosine_lr`
(1-based epoch). Text features use the exact savings of :mod:`reid_pipeline.model.prompt`
(truncated context, each distinct label once, shared prefix).

:func:`train_prompts` checkpoints its full state (tokens, Adam, RNG) every ``checkpoint_every``
epochs and resumes from it, so a killed run ends with the same tokens as an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reid_pipeline.device import DeviceSpec, resolve_device
from reid_pipeline.model.prompt import PromptLearner, TextEncoder, default_template, encode_labels, _text_dims
from reid_pipeline.storage import load_training_state, save_training_state, tensors_fingerprint
from reid_pipeline.training.schedulers import set_lr, warmup_cosine_lr
from reid_pipeline.training.supcon import average_positives, stage1_loss

__all__ = [
    "Stage1Error",
    "NonFiniteLossError",
    "Stage1Config",
    "Stage1Result",
    "compute_image_features",
    "train_prompts",
]

STATE_FORMAT = "reid_pipeline.stage1.v1"
# Config fields that do not change the trajectory: they may differ between a run and its resume.
_RESUME_FREE_FIELDS = {"checkpoint_every"}


class Stage1Error(ValueError):
    """Inputs that do not fit stage 1 (labels, feature dims, CLIP, a foreign resume state)."""


class NonFiniteLossError(FloatingPointError):
    """The stage-1 loss became NaN or infinite."""


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
class Stage1Result:
    """What :func:`train_prompts` returns. ``prompt_learner`` stays on the training device."""

    prompt_learner: PromptLearner
    loss_per_epoch: list[float]
    avg_positives: float
    wall_time: float
    samples_per_s: float
    final_loss: float
    lr_per_epoch: list[float] = field(default_factory=list)
    resumed_from_epoch: int = 0


def compute_image_features(
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Any],
    device_spec: DeviceSpec | None = None,
) -> torch.Tensor:
    """Run a frozen image encoder once over preprocessed image batches: (N, D) float32 on the CPU.

    ``batches`` yields image tensors (B, 3, H, W) or tuples/lists whose first item is one (as a
    DataLoader of ``(image, pid, ...)`` does). No gradients; autocast on a GPU.
    """
    spec = device_spec or resolve_device("cpu", "fp32")
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise Stage1Error(
                    f"image batch {i}: expected a (B, 3, H, W) tensor, got {getattr(images, 'shape', type(images).__name__)}"
                )
            with spec.autocast():
                feats = encode_fn(images.to(spec.device, non_blocking=True))
            if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != images.shape[0]:
                raise Stage1Error(
                    f"image batch {i}: the encoder returned {getattr(feats, 'shape', type(feats).__name__)}, "
                    f"expected ({images.shape[0]}, D)"
                )
            feats = feats.float().cpu()
            if not torch.isfinite(feats).all():
                raise Stage1Error(f"image batch {i}: the encoder returned non-finite features")
            out.append(feats)
    if not out:
        raise Stage1Error("compute_image_features got no image batches")
    return torch.cat(out, dim=0)


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


def _config_for_resume(config: Stage1Config) -> dict[str, Any]:
    return {k: v for k, v in config.model_dump().items() if k not in _RESUME_FREE_FIELDS}


def train_prompts(
    clip_model: nn.Module,
    image_features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: Stage1Config | None = None,
    device_spec: DeviceSpec | None = None,
    state_path: str | Path | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> Stage1Result:
    """Learn the prompt tokens of ``num_classes`` identities from precomputed image features.

    Args:
        clip_model: a frozen openai-clip model; its text tower is used, its weights never change.
        image_features: (N, embed_dim) from :func:`compute_image_features`.
        labels: (N,) integer class indices in ``[0, num_classes)``.
        config: hyper-parameters (default: ``Stage1Config()``, the ViT-B/16 recipe).
        device_spec: where and in which precision to train (default: CPU, fp32).
        state_path: a ``.safetensors`` training-state file written every ``config.checkpoint_every``
            epochs and after the last; if it exists at the start, training resumes from it (the
            config, except ``checkpoint_every``, and the data must be the same).
        log: called after every epoch with ``epoch, epochs, loss, lr, samples_per_s, eta_s,
            avg_positives, epoch_time_s, steps``; an exception raised there stops the run after that
            epoch's checkpoint.

    Raises:
        Stage1Error: bad inputs or a resume state written for another config or data.
        NonFiniteLossError: the loss became NaN/inf (names epoch and step).
    """
    config = config or Stage1Config()
    spec = device_spec or resolve_device("cpu", "fp32")
    _validate(clip_model, image_features, labels, num_classes)
    device = spec.device

    generator = torch.Generator().manual_seed(int(config.seed))
    prompt_learner = PromptLearner(
        num_classes, clip_model, config.n_ctx, config.resolved_template(),
        truncate=config.truncate_context, generator=generator,
    ).to(device)
    text_encoder = TextEncoder(clip_model)
    if text_encoder.positional_embedding.device != device:
        text_encoder = copy.deepcopy(text_encoder).to(device)  # leave the caller's model where it is

    features_cpu = image_features.detach().to("cpu", torch.float32).contiguous()
    labels_cpu = labels.detach().to("cpu", torch.long).contiguous()
    data_fp = tensors_fingerprint({"image_features": features_cpu, "labels": labels_cpu})
    features = features_cpu.to(device)
    targets = labels_cpu.to(device)
    n = features.shape[0]

    optimizer = torch.optim.Adam([prompt_learner.cls_ctx], lr=config.lr, weight_decay=config.weight_decay)
    scaler = spec.grad_scaler()
    history: dict[str, Any] = {"loss": [], "lr": [], "avg_positives": [], "wall_time": 0.0, "samples": 0}
    start_epoch = 0
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.suffix != ".safetensors":
        raise Stage1Error(f"state_path {state_path}: expected a file name ending in .safetensors")
    if state_path is not None and state_path.exists():
        start_epoch, history = _resume(
            state_path, prompt_learner, optimizer, generator, scaler, config, data_fp, num_classes
        )

    frozen_flags = [(p, p.requires_grad) for p in text_encoder.parameters()]
    for p, _ in frozen_flags:
        p.requires_grad_(False)
    prefix_kv = None
    if config.prefix_cache:  # constant while CLIP is frozen: once per run instead of once per step
        with torch.no_grad(), spec.autocast():
            prefix_kv = text_encoder.prefix_states(prompt_learner.token_prefix)
    epoch_times: list[float] = []
    try:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            lr = warmup_cosine_lr(
                epoch, config.lr, config.epochs, config.warmup_epochs, config.warmup_lr_init, config.min_lr
            )
            set_lr(optimizer, lr)
            perm = torch.randperm(n, generator=generator)
            perm_dev = perm.to(device)
            step_losses: list[torch.Tensor] = []
            sizes: list[int] = []
            positives = 0.0
            for start in range(0, n, config.batch_size):  # the last batch is partial, never empty
                idx = perm_dev[start : start + config.batch_size]
                batch_labels = targets[idx]
                optimizer.zero_grad(set_to_none=True)
                with spec.autocast():
                    text = encode_labels(
                        prompt_learner, text_encoder, batch_labels,
                        distinct=config.distinct_labels, prefix_cache=config.prefix_cache, prefix_kv=prefix_kv,
                    )
                loss = stage1_loss(features[idx], text.float(), batch_labels)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step_losses.append(loss.detach())
                sizes.append(int(idx.numel()))
                positives += average_positives(labels_cpu[perm[start : start + config.batch_size]]) * idx.numel()
            losses = torch.stack(step_losses).double().cpu()
            bad = (~torch.isfinite(losses)).nonzero().flatten()
            if bad.numel():
                step = int(bad[0]) + 1
                raise NonFiniteLossError(
                    f"stage 1: non-finite loss ({float(losses[bad[0]])}) at epoch {epoch}, step {step} of "
                    f"{len(sizes)} (lr {lr:.3g}); check the image features and the learning rate"
                )
            epoch_loss = float((losses * torch.tensor(sizes, dtype=torch.float64)).sum() / n)
            epoch_time = time.perf_counter() - t0
            epoch_times.append(epoch_time)
            history["loss"].append(epoch_loss)
            history["lr"].append(float(lr))
            history["avg_positives"].append(positives / n)
            history["wall_time"] += epoch_time
            history["samples"] += n
            if state_path is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
                _save(state_path, prompt_learner, optimizer, generator, scaler, config, data_fp, num_classes, epoch, history)
            if log is not None:
                mean_time = sum(epoch_times) / len(epoch_times)
                log({
                    "epoch": epoch,
                    "epochs": config.epochs,
                    "loss": epoch_loss,
                    "lr": float(lr),
                    "samples_per_s": n / epoch_time if epoch_time > 0 else math.inf,
                    "eta_s": mean_time * (config.epochs - epoch),
                    "avg_positives": positives / n,
                    "epoch_time_s": epoch_time,
                    "steps": len(sizes),
                })
    finally:
        for p, flag in frozen_flags:
            p.requires_grad_(flag)

    wall = float(history["wall_time"])
    return Stage1Result(
        prompt_learner=prompt_learner,
        loss_per_epoch=list(history["loss"]),
        avg_positives=float(sum(history["avg_positives"]) / max(len(history["avg_positives"]), 1)),
        wall_time=wall,
        samples_per_s=float(history["samples"] / wall) if wall > 0 else 0.0,
        final_loss=float(history["loss"][-1]) if history["loss"] else math.nan,
        lr_per_epoch=list(history["lr"]),
        resumed_from_epoch=start_epoch,
    )


def _save(
    path: Path,
    prompt_learner: PromptLearner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler,
    config: Stage1Config,
    data_fp: str,
    num_classes: int,
    epoch: int,
    history: dict[str, Any],
) -> None:
    save_training_state(
        path,
        # The epoch is stored with the tensors too: the sidecar is a separate file, and a crash between
        # the two writes must be detected rather than resumed from mismatched halves.
        model_tensors={"cls_ctx": prompt_learner.cls_ctx.detach(), "epoch": torch.tensor(epoch, dtype=torch.int64)},
        optimizer=optimizer,
        generators={"stage1": generator},
        epoch=epoch,
        extra={
            "format": STATE_FORMAT,
            "config": _config_for_resume(config),
            "data_fingerprint": data_fp,
            "num_classes": int(num_classes),
            "history": history,
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        },
    )


def _resume(
    path: Path,
    prompt_learner: PromptLearner,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler,
    config: Stage1Config,
    data_fp: str,
    num_classes: int,
) -> tuple[int, dict[str, Any]]:
    tensors, epoch, extra = load_training_state(path, restore_global_rng=False)
    if extra.get("format") != STATE_FORMAT:
        raise Stage1Error(f"{path}: not a stage-1 training state (format {extra.get('format')!r}, expected {STATE_FORMAT!r})")
    if int(tensors["epoch"]) != epoch:
        raise Stage1Error(
            f"{path}: torn checkpoint (tensors from epoch {int(tensors['epoch'])}, sidecar from epoch {epoch}); "
            "delete it to start over"
        )
    saved, current = extra["config"], _config_for_resume(config)
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise Stage1Error(f"{path}: training state was written with a different stage-1 config ({detail})")
    if int(extra["num_classes"]) != num_classes:
        raise Stage1Error(f"{path}: training state is for {extra['num_classes']} classes, this run has {num_classes}")
    if extra["data_fingerprint"] != data_fp:
        raise Stage1Error(f"{path}: training state was written for different image features or labels")
    ctx = tensors["cls_ctx"]
    if tuple(ctx.shape) != tuple(prompt_learner.cls_ctx.shape):
        raise Stage1Error(
            f"{path}: prompt tokens of shape {tuple(ctx.shape)}, expected {tuple(prompt_learner.cls_ctx.shape)} "
            "(classes, n_ctx, text width)"
        )
    with torch.no_grad():
        prompt_learner.cls_ctx.copy_(ctx.to(prompt_learner.cls_ctx.device))
    load_training_state(path, optimizer=optimizer, generators={"stage1": generator}, restore_global_rng=False)
    if extra.get("grad_scaler") and scaler.is_enabled():
        scaler.load_state_dict(extra["grad_scaler"])
    history = dict(extra["history"])
    return epoch, history
