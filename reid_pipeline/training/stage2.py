"""Stage 2 of CLIP-ReID: fine-tune the image encoder with ID, triplet and image-to-text losses.

The recipe (CLIP-ReID ``processor/processor_clipreid_stage2.py``, ``solver/make_optimizer_prompt.py``,
``configs/person/*_clipreid.yml``):

* the text encoder and stage-1 prompts are frozen — here they are not even in the loop: the caller
  computes the text features of **all** identities once (``text_features``, ``(C, embed)``) and
  they enter the loss as a constant;
* trainable: the whole image encoder, both BNNecks (bias frozen), both classifiers and, with SIE,
  the camera embedding;
* P×K batches (:class:`~reid_pipeline.data.sampler.PKSampler`), augmentations batched on the
  training device (:class:`~reid_pipeline.data.transforms.TrainTransform`) from a decode-once
  :class:`~reid_pipeline.data.cache.ImageCache`;
* Adam with two parameter groups (bias: lr × ``bias_lr_factor``, ``weight_decay_bias``), the rate
  set once per epoch from CLIP-ReID's ``WarmupMultiStepLR`` with the 1-based epoch;
* mixed precision from the :class:`~reid_pipeline.device.DeviceSpec` (bf16 autocast, or fp16 with a
  grad scaler); losses in float32.

Every epoch ends with an atomic training-state checkpoint (model, optimiser, grad scaler, sampler
and augmentation generators, history). Calling :func:`train_visual_encoder` again with the same
``state_path`` resumes after the last completed epoch and ends bit-identical to an uninterrupted run
(CPU, same seed). A NaN/inf loss stops the run with :class:`NonFiniteLossError` naming the epoch and
step; the checkpoint of the last good epoch is left as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.sampler import PKSampler
from reid_pipeline.data.transforms import TrainTransform, normalization_for
from reid_pipeline.device import DeviceSpec
from reid_pipeline.model.reid_model import ReIDModel
from reid_pipeline.storage import CheckpointError, atomic_write_bytes, load_training_state, save_training_state
from reid_pipeline.training.losses import LOSS_WEIGHTS, Stage2Loss
from reid_pipeline.training.schedulers import set_lr, warmup_multistep_lr

__all__ = [
    "Stage2Config",
    "Stage2Result",
    "NonFiniteLossError",
    "Stage1MismatchError",
    "build_reid_model",
    "build_optimizer",
    "stage2_lr",
    "make_train_transform",
    "train_visual_encoder",
    "plot_stage2_history",
]

LOSS_TERMS = ("loss", "id", "triplet", "i2t")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; names the epoch and step (1-based)."""

    def __init__(self, message: str, *, epoch: int, step: int, terms: dict[str, float], checkpoint: str | None):
        super().__init__(message)
        self.epoch, self.step, self.terms, self.checkpoint = epoch, step, terms, checkpoint


class Stage1MismatchError(ValueError):
    """The stage-1 text features do not fit the training data or the image encoder."""


class Stage2Config(BaseModel):
    """Every knob of stage 2. :meth:`paper` gives CLIP-ReID's person presets."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["vit", "resnet"] = "vit"
    # optimiser and schedule
    max_epochs: int = Field(60, ge=1)
    base_lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_bias: float = Field(1e-4, ge=0)
    bias_lr_factor: float = Field(2.0, gt=0)
    steps: list[int] = Field(default_factory=lambda: [30, 50])
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: int = Field(10, ge=0)
    warmup_factor: float = Field(0.1, gt=0, le=1)
    warmup_method: Literal["linear", "constant"] = "linear"
    # batches
    ids_per_batch: int = Field(16, ge=2, description="P identities per batch")
    instances_per_id: int = Field(4, ge=1, description="K images per identity")
    max_iters_per_epoch: int | None = Field(None, ge=1, description="cap on iterations per epoch (CI / smoke runs)")
    # losses
    id_loss_weight: float = Field(0.25, ge=0)
    triplet_loss_weight: float = Field(1.0, ge=0)
    i2t_loss_weight: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    triplet_margin: float = Field(0.3, ge=0)
    # input and augmentation
    input_size: tuple[int, int] = (256, 128)
    flip_p: float = Field(0.5, ge=0, le=1)
    padding: int = Field(10, ge=0)
    erase_p: float = Field(0.5, ge=0, le=1)
    pixel_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pixel_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # options
    sie_camera: bool = False
    sie_coe: float = 3.0
    stride: int | None = Field(None, ge=1, description="ViT patch stride; 12 = overlapping patches (OLP)")
    # bookkeeping
    seed: int = 1234
    log_period: int = Field(50, ge=1, description="log every N iterations (and at every epoch end)")

    @model_validator(mode="after")
    def _check(self) -> "Stage2Config":
        if list(self.steps) != sorted(self.steps):
            raise ValueError(f"steps must be increasing, got {self.steps}")
        if min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive (height, width), got {self.input_size}")
        if self.stride is not None and self.arch != "vit":
            raise ValueError("stride (OLP) applies to ViT backbones only")
        if self.sie_camera and self.arch != "vit":
            raise ValueError("SIE (sie_camera) applies to ViT backbones only, as in CLIP-ReID")
        return self

    @classmethod
    def paper(cls, arch: str = "vit", **overrides: Any) -> "Stage2Config":
        """CLIP-ReID's person preset for ``arch`` (``"vit"`` = ViT-B/16, ``"resnet"`` = RN50)."""
        mean, std = normalization_for(arch)
        w_id, w_tri, w_i2t = LOSS_WEIGHTS[arch]
        if arch == "vit":
            base = dict(base_lr=5e-6, weight_decay=1e-4, weight_decay_bias=1e-4, max_epochs=60, steps=[30, 50], warmup_factor=0.1)
        else:
            base = dict(base_lr=3.5e-4, weight_decay=5e-4, weight_decay_bias=5e-4, max_epochs=120, steps=[40, 70], warmup_factor=0.01)
        base.update(
            arch=arch, gamma=0.1, warmup_epochs=10, warmup_method="linear", bias_lr_factor=2.0,
            ids_per_batch=16, instances_per_id=4, id_loss_weight=w_id, triplet_loss_weight=w_tri,
            i2t_loss_weight=w_i2t, label_smoothing=0.1, triplet_margin=0.3, input_size=(256, 128),
            flip_p=0.5, padding=10, erase_p=0.5, pixel_mean=mean, pixel_std=std,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.instances_per_id

    def fingerprint(self) -> str:
        """Hash of everything that changes the training trajectory (not ``log_period``)."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"log_period"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Stage2Result:
    """What a (possibly partial) run produced. ``history`` has one dict per completed epoch."""

    history: list[dict[str, float]]
    final_accuracy: float
    final_id_accuracy: float
    images_per_second: float
    wall_time_s: float
    epochs_completed: int
    completed: bool
    resumed_from_epoch: int
    iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_reid_model(clip_model: torch.nn.Module, num_classes: int, config: Stage2Config, num_cameras: int = 0) -> ReIDModel:
    """A :class:`ReIDModel` consistent with ``config`` (SIE on → ``num_cameras`` embeddings)."""
    if config.sie_camera and num_cameras < 1:
        raise ValueError("sie_camera is on: pass the number of training cameras (num_cameras >= 1)")
    return ReIDModel(
        clip_model, num_classes, num_cameras=num_cameras if config.sie_camera else 0, sie_coe=config.sie_coe, seed=config.seed
    )


def build_optimizer(model: torch.nn.Module, config: Stage2Config) -> torch.optim.Adam:
    """Adam over trainable parameters: a weight group and a bias group (lr_scale = bias_lr_factor)."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if "bias" in name else weights).append(p)
    groups = [
        {"params": weights, "lr": config.base_lr, "weight_decay": config.weight_decay, "lr_scale": 1.0, "name": "weights"},
        {"params": biases, "lr": config.base_lr * config.bias_lr_factor, "weight_decay": config.weight_decay_bias,
         "lr_scale": config.bias_lr_factor, "name": "biases"},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=config.base_lr)


def stage2_lr(epoch: int, config: Stage2Config) -> float:
    """Base learning rate of (1-based) ``epoch``: CLIP-ReID's WarmupMultiStepLR."""
    return warmup_multistep_lr(
        epoch, config.base_lr, config.steps, gamma=config.gamma, warmup_factor=config.warmup_factor,
        warmup_epochs=config.warmup_epochs, warmup_method=config.warmup_method,
    )


def make_train_transform(config: Stage2Config, generator: torch.Generator | None = None) -> TrainTransform:
    return TrainTransform(
        size=config.input_size, flip_p=config.flip_p, pad=config.padding, erase_p=config.erase_p,
        mean=config.pixel_mean, std=config.pixel_std, generator=generator,
    )


def _as_long(values: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values))
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer array, got dtype {t.dtype} and shape {tuple(t.shape)}")
    return t.long()


def _validate(
    model: ReIDModel, text_features: torch.Tensor, cache: ImageCache, labels: torch.Tensor,
    camids: torch.Tensor | None, config: Stage2Config,
) -> int:
    n = len(cache)
    if labels.numel() != n:
        raise ValueError(f"labels has {labels.numel()} entries but the image cache holds {n} images")
    if n == 0:
        raise ValueError("no training images")
    classes = torch.unique(labels)
    num_classes = int(classes.numel())
    if int(classes.min()) != 0 or int(classes.max()) != num_classes - 1:
        raise ValueError(
            f"labels must be contiguous 0..C-1 (use the manifest's label map); got {num_classes} distinct values "
            f"from {int(classes.min())} to {int(classes.max())}"
        )
    if text_features.dim() != 2:
        raise Stage1MismatchError(f"text_features must be (num_classes, embed_dim), got shape {tuple(text_features.shape)}")
    if text_features.shape[0] != num_classes:
        raise Stage1MismatchError(
            f"stage-1 text features cover {text_features.shape[0]} identities but the training data has {num_classes}: "
            "the prompt checkpoint was learned on a different identity set — stage 1 must be rematerialised"
        )
    if text_features.shape[1] != model.proj_dim:
        raise Stage1MismatchError(
            f"stage-1 text features are {text_features.shape[1]}-d but the image encoder projects to {model.proj_dim}-d: "
            "stage 1 was run with a different CLIP — stage 1 must be rematerialised"
        )
    if model.num_classes != num_classes:
        raise ValueError(f"the ReIDModel was built for {model.num_classes} classes, the training data has {num_classes}")
    if model.arch != config.arch:
        raise ValueError(f"config.arch is {config.arch!r} but the model's encoder is {model.arch!r}")
    if model.input_size is not None and tuple(model.input_size) != tuple(config.input_size):
        raise ValueError(
            f"the CLIP encoder is adapted to {model.input_size} but config.input_size is {tuple(config.input_size)}; "
            "load CLIP with the same input size"
        )
    if config.arch == "vit" and config.stride is not None and model.stride != config.stride:
        raise ValueError(f"config.stride is {config.stride} but the encoder uses stride {model.stride}; load CLIP with stride={config.stride}")
    if config.sie_camera != bool(model.num_cameras):
        raise ValueError(f"config.sie_camera is {config.sie_camera} but the model has {model.num_cameras} camera embeddings")
    if model.num_cameras:
        if camids is None:
            raise ValueError("SIE is on: camids are required")
        if camids.numel() != n:
            raise ValueError(f"camids has {camids.numel()} entries but the image cache holds {n} images")
        if int(camids.min()) < 0 or int(camids.max()) >= model.num_cameras:
            raise ValueError(
                f"camids must be in [0, {model.num_cameras}) (0-based camera index), got {int(camids.min())}..{int(camids.max())}"
            )
    return num_classes


def _data_fingerprint(labels: torch.Tensor, camids: torch.Tensor | None, cache: ImageCache) -> str:
    h = hashlib.sha256()
    h.update(labels.cpu().numpy().astype(np.int64).tobytes())
    if camids is not None:
        h.update(camids.cpu().numpy().astype(np.int64).tobytes())
    h.update(np.asarray(cache.shapes, dtype=np.int64).tobytes())
    return h.hexdigest()


def _emit(log: Callable[[str], None] | logging.Logger | None, msg: str) -> None:
    if log is None:
        return
    if hasattr(log, "info"):
        log.info(msg)
    else:
        log(msg)


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def train_visual_encoder(
    model: ReIDModel,
    text_features: torch.Tensor,
    cache: ImageCache,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    camids: Sequence[int] | np.ndarray | torch.Tensor | None,
    config: Stage2Config,
    device_spec: DeviceSpec,
    state_path: str | os.PathLike | None = None,
    log: Callable[[str], None] | logging.Logger | None = None,
    stop_after_epoch: int | None = None,
) -> Stage2Result:
    """Run (or resume) stage 2 on ``cache`` with ``labels`` (0..C-1) and frozen ``text_features``.

    ``camids`` (0-based) are needed when the model has SIE, otherwise ignored. ``state_path``
    (``*.safetensors``) enables per-epoch checkpoints and resuming. ``stop_after_epoch`` ends the
    call after that epoch has been checkpointed (``completed=False``) — a planned interruption.
    """
    labels_t = _as_long(labels, "labels")
    cam_t = _as_long(camids, "camids") if camids is not None else None
    text_features = text_features.detach()
    num_classes = _validate(model, text_features, cache, labels_t, cam_t, config)
    if stop_after_epoch is not None and stop_after_epoch < 1:
        raise ValueError(f"stop_after_epoch must be >= 1, got {stop_after_epoch}")

    device = device_spec.device
    model.to(device)
    text_dev = text_features.to(device=device, dtype=torch.float32)
    labels_dev = labels_t.to(device)
    cams_dev = cam_t.to(device) if (cam_t is not None and model.num_cameras) else None

    sampler_gen = torch.Generator().manual_seed(config.seed)
    augment_gen = torch.Generator().manual_seed(config.seed + 1)
    sampler = PKSampler(labels_t, config.ids_per_batch, config.instances_per_id, generator=sampler_gen)
    transform = make_train_transform(config, augment_gen)
    optimizer = build_optimizer(model, config)
    scaler = device_spec.grad_scaler()
    criterion = Stage2Loss(
        num_classes, id_weight=config.id_loss_weight, triplet_weight=config.triplet_loss_weight,
        i2t_weight=config.i2t_loss_weight, epsilon=config.label_smoothing, margin=config.triplet_margin,
    )
    generators = {"sampler": sampler_gen, "augment": augment_gen}
    config_fp, data_fp = config.fingerprint(), _data_fingerprint(labels_t, cam_t, cache)

    history: list[dict[str, float]] = []
    start_epoch = 0
    state_file = Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.is_file():
        tensors, start_epoch, extra = load_training_state(state_file, optimizer=optimizer, generators=generators)
        if extra.get("config_fingerprint") != config_fp or extra.get("data_fingerprint") != data_fp:
            raise CheckpointError(
                f"{state_file}: training state belongs to a different run (config or training data changed); "
                "delete it to start stage 2 afresh"
            )
        model.load_state_tensors(tensors, source=str(state_file))
        if extra.get("scaler"):
            scaler.load_state_dict(extra["scaler"])
        history = list(extra.get("history", []))
        _emit(log, f"stage 2: resuming from {state_file} after epoch {start_epoch}/{config.max_epochs}")

    steps_per_epoch = len(sampler)
    if config.max_iters_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_iters_per_epoch)
    _emit(
        log,
        f"stage 2: {len(cache)} images, {num_classes} identities, {config.ids_per_batch}x{config.instances_per_id} "
        f"batches (~{steps_per_epoch}/epoch), {config.max_epochs} epochs, {device_spec.precision} on {device}",
    )

    t_call = time.perf_counter()
    train_seconds, train_images, iterations = 0.0, 0, 0
    last_epoch = start_epoch
    xbuf: torch.Tensor | None = None
    final_epoch = config.max_epochs if stop_after_epoch is None else min(config.max_epochs, stop_after_epoch)
    for epoch in range(start_epoch + 1, final_epoch + 1):
        lr = stage2_lr(epoch, config)
        set_lr(optimizer, lr)
        model.train()
        t0 = time.perf_counter()
        sums = {k: 0.0 for k in (*LOSS_TERMS, "acc", "id_acc")}
        n_steps, n_images = 0, 0
        batches = iter(sampler)
        for step, batch in enumerate(batches, start=1):
            if config.max_iters_per_epoch and step > config.max_iters_per_epoch:
                break
            idx = torch.tensor(batch, dtype=torch.long)
            images = cache.fetch(idx, device)
            if device.type == "cpu":
                # reuse one output buffer: a fresh 25 MB tensor per batch costs page faults on the CPU;
                # the previous batch is no longer needed once its backward pass has run.
                if xbuf is None or xbuf.shape[0] != idx.numel():
                    xbuf = torch.empty(idx.numel(), 3, *config.input_size)
                x = transform(images, out=xbuf)
            else:
                x = transform(images)
            idx_dev = idx.to(device)
            target = labels_dev[idx_dev]
            cams = cams_dev[idx_dev] if cams_dev is not None else None
            with device_spec.autocast():
                logits, feats, proj = model(x, cams)
            out = criterion(logits, feats, proj, text_dev, target)
            with torch.no_grad():
                acc = (out.i2t_logits.argmax(dim=1) == target).float().mean()
                id_acc = (logits[0].argmax(dim=1) == target).float().mean()
                values = torch.stack([out.total.detach(), out.id.detach(), out.triplet.detach(), out.i2t.detach(),
                                      acc, id_acc]).float().tolist()
            terms = dict(zip((*LOSS_TERMS, "acc", "id_acc"), values))
            if not all(math.isfinite(v) for v in values[:4]):
                where = f"{state_file} (epoch {last_epoch})" if state_file is not None and state_file.is_file() else "none"
                raise NonFiniteLossError(
                    f"stage 2: non-finite loss at epoch {epoch}, step {step}/{steps_per_epoch} "
                    f"(loss={terms['loss']}, id={terms['id']}, triplet={terms['triplet']}, i2t={terms['i2t']}); "
                    f"stopped without saving — last good checkpoint: {where}",
                    epoch=epoch, step=step, terms={k: terms[k] for k in LOSS_TERMS},
                    checkpoint=str(state_file) if where != "none" else None,
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.total).backward()
            scaler.step(optimizer)
            scaler.update()
            for k, v in terms.items():
                sums[k] += v
            n_steps += 1
            n_images += int(idx.numel())
            if step % config.log_period == 0:
                _emit(log, f"epoch {epoch} iter {step}/{steps_per_epoch} loss {terms['loss']:.4f} acc {terms['acc']:.3f} lr {lr:.2e}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if n_steps == 0:
            raise ValueError("stage 2: the P×K sampler produced no batch (too few identities or images)")
        train_seconds += seconds
        train_images += n_images
        iterations += n_steps
        stats = {k: v / n_steps for k, v in sums.items()}
        stats.update(epoch=epoch, lr=lr, iterations=n_steps, images=n_images, seconds=seconds, img_per_s=n_images / seconds)
        history.append(stats)
        last_epoch = epoch
        done_here = epoch - start_epoch
        eta = (train_seconds / done_here) * (config.max_epochs - epoch)
        _emit(
            log,
            f"epoch {epoch}/{config.max_epochs} loss {stats['loss']:.4f} (id {stats['id']:.4f}, triplet {stats['triplet']:.4f}, "
            f"i2t {stats['i2t']:.4f}) acc {stats['acc']:.3f} id_acc {stats['id_acc']:.3f} lr {lr:.2e} "
            f"{stats['img_per_s']:.1f} img/s ETA {_fmt_eta(eta)}",
        )
        if state_file is not None:
            save_training_state(
                state_file, model_tensors=model.state_tensors(), optimizer=optimizer, generators=generators, epoch=epoch,
                extra={"history": history, "config_fingerprint": config_fp, "data_fingerprint": data_fp,
                       "scaler": scaler.state_dict() if scaler.is_enabled() else {}},
            )

    model.eval()
    final = history[-1] if history else {}
    return Stage2Result(
        history=history,
        final_accuracy=float(final.get("acc", float("nan"))),
        final_id_accuracy=float(final.get("id_acc", float("nan"))),
        images_per_second=train_images / train_seconds if train_seconds > 0 else float("nan"),
        wall_time_s=time.perf_counter() - t_call,
        epochs_completed=last_epoch,
        completed=last_epoch >= config.max_epochs,
        resumed_from_epoch=start_epoch,
        iterations=iterations,
    )


def plot_stage2_history(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path:
    """PNG of the loss terms, train accuracy and learning rate per epoch (written atomically)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    if not history:
        raise ValueError("no epochs to plot")
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key in LOSS_TERMS:
        axes[0].plot(epochs, [h[key] for h in history], marker="o", ms=3, label=key)
    axes[0].set_title("stage-2 loss terms (unweighted)")
    axes[0].legend()
    axes[1].plot(epochs, [h["acc"] for h in history], marker="o", ms=3, label="i2t acc")
    axes[1].plot(epochs, [h["id_acc"] for h in history], marker="o", ms=3, label="id acc")
    axes[1].set_ylim(0, 1)
    axes[1].set_title("train accuracy")
    axes[1].legend()
    axes[2].plot(epochs, [h["lr"] for h in history], marker="o", ms=3)
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
