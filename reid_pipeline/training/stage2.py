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

The epochs run in the shared loop (:func:`~reid_pipeline.training.loop.run_training`): an atomic
training-state checkpoint every ``checkpoint_every`` epochs (model, optimiser, grad scaler, sampler
and augmentation generators, history), torn-state detection, the non-finite-loss guard. Calling
:func:`train_visual_encoder` again with the same
``state_path`` resumes after the last completed epoch and ends bit-identical to an uninterrupted run
(CPU, same seed). A NaN/inf loss stops the run with :class:`NonFiniteLossError` naming the epoch and
step; the checkpoint of the last good epoch is left as it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
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
from reid_pipeline.training.loop import LoopResult, NonFiniteLossError, RankHooks, run_training
from reid_pipeline.training.losses import LOSS_WEIGHTS, Stage2Loss
from reid_pipeline.training.distributed import Parallel, shard_augment_params
from reid_pipeline.training.schedulers import set_lr, warmup_multistep_lr

__all__ = [
    "LOSS_TERMS",
    "Stage2Config",
    "Stage2Result",
    "NonFiniteLossError",
    "Stage1MismatchError",
    "build_reid_model",
    "build_optimizer",
    "stage2_lr",
    "make_train_transform",
    "train_visual_encoder",
]

LOSS_TERMS = ("loss", "id", "triplet", "i2t")
# Config fields that do not change the trajectory: they may differ between a run and its resume.
_RESUME_FREE_FIELDS = {"log_period", "checkpoint_every"}


class Stage1MismatchError(ValueError):
    """The stage-1 text features do not fit the training data or the image encoder."""


class Stage2Config(BaseModel):
    """Every knob of stage 2. :meth:`paper` gives CLIP-ReID's person presets."""

    model_config = ConfigDict(extra="forbid")

    arch: Literal["vit", "resnet"] = "vit"
    # optimiser and schedule
    epochs: int = Field(60, ge=1)
    lr: float = Field(5e-6, gt=0, description="base learning rate (biases: lr x bias_lr_factor)")
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
    checkpoint_every: int = Field(1, ge=1, description="epochs between resumable training-state saves")

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
            base = dict(lr=5e-6, weight_decay=1e-4, weight_decay_bias=1e-4, epochs=60, steps=[30, 50], warmup_factor=0.1)
        else:
            base = dict(lr=3.5e-4, weight_decay=5e-4, weight_decay_bias=5e-4, epochs=120, steps=[40, 70], warmup_factor=0.01)
        base.update(
            arch=arch, gamma=0.1, warmup_epochs=10, warmup_method="linear", bias_lr_factor=2.0,
            ids_per_batch=16, instances_per_id=4, id_loss_weight=w_id, triplet_loss_weight=w_tri,
            i2t_loss_weight=w_i2t, label_smoothing=0.1, triplet_margin=0.3, input_size=(256, 128),
            flip_p=0.5, padding=10, erase_p=0.5, pixel_mean=mean, pixel_std=std,
        )
        base.update(overrides)
        if "padding" not in overrides:
            # the paper pads 10 px at its 256-pixel input height: the same share of a smaller input
            base["padding"] = max(1, round(10 * int(base["input_size"][0]) / 256))
        return cls(**base)

    @property
    def batch_size(self) -> int:
        return self.ids_per_batch * self.instances_per_id

    def fingerprint(self) -> str:
        """Hash of everything that changes the training trajectory (not ``log_period``, ``checkpoint_every``)."""
        blob = json.dumps(self.model_dump(mode="json", exclude=_RESUME_FREE_FIELDS), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Stage2Result(LoopResult):
    """:class:`~reid_pipeline.training.loop.LoopResult` plus the last epoch's train accuracies."""

    final_accuracy: float = float("nan")
    final_id_accuracy: float = float("nan")
    precision: str = "fp32"


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
        {"params": weights, "lr": config.lr, "weight_decay": config.weight_decay, "lr_scale": 1.0, "name": "weights"},
        {"params": biases, "lr": config.lr * config.bias_lr_factor, "weight_decay": config.weight_decay_bias,
         "lr_scale": config.bias_lr_factor, "name": "biases"},
    ]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=config.lr)


def stage2_lr(epoch: int, config: Stage2Config) -> float:
    """Base learning rate of (1-based) ``epoch``: CLIP-ReID's WarmupMultiStepLR."""
    return warmup_multistep_lr(
        epoch, config.lr, config.steps, gamma=config.gamma, warmup_factor=config.warmup_factor,
        warmup_epochs=config.warmup_epochs, warmup_method=config.warmup_method,
    )


def make_train_transform(config: Stage2Config, generator: torch.Generator | None = None) -> TrainTransform:
    return TrainTransform(
        size=config.input_size, flip_p=config.flip_p, pad=config.padding, erase_p=config.erase_p,
        mean=config.pixel_mean, std=config.pixel_std, generator=generator,
    )


def _as_long(values: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.array(values))
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
        raise ValueError(f"config.stride is {config.stride} but the encoder uses stride {model.stride}; "
                         f"load CLIP with stride={config.stride}")
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


class _EncoderStage:
    """Stage 2 as the shared loop sees it: one epoch = the P×K sampler's batches (capped)."""

    name = "stage 2"

    def __init__(self, model: ReIDModel, text_features: torch.Tensor, cache: ImageCache, labels: torch.Tensor,
                 camids: torch.Tensor | None, num_classes: int, config: Stage2Config, spec: DeviceSpec,
                 parallel: Parallel | None = None):
        self.model, self.cache, self.config, self.spec, self.epochs = model, cache, config, spec, config.epochs
        device = spec.device
        model.to(device)
        # Under torch.distributed: every rank draws the same P×K batches and augmentation parameters
        # and keeps its slice; the model runs in DDP (optionally with synchronised BatchNorm).
        self.parallel = parallel
        if parallel is not None:
            parallel.check_batch(config.batch_size, "stage 2 ids_per_batch × instances_per_id")
        self.net = parallel.wrap(model) if parallel is not None else model
        self.text = text_features.to(device=device, dtype=torch.float32)
        self.labels = labels.to(device)
        self.cams = camids.to(device) if (camids is not None and model.num_cameras) else None
        sampler_gen = torch.Generator().manual_seed(config.seed)
        augment_gen = torch.Generator().manual_seed(config.seed + 1)
        self.generators = {"sampler": sampler_gen, "augment": augment_gen}
        self.sampler = PKSampler(labels, config.ids_per_batch, config.instances_per_id, generator=sampler_gen)
        self.transform = make_train_transform(config, augment_gen)
        self.optimizer = build_optimizer(model, config)
        self.scaler = spec.grad_scaler()
        self.criterion = Stage2Loss(
            num_classes, id_weight=config.id_loss_weight, triplet_weight=config.triplet_loss_weight,
            i2t_weight=config.i2t_loss_weight, epsilon=config.label_smoothing, margin=config.triplet_margin,
        )
        self.data_fp = _data_fingerprint(labels, camids, cache)
        self.steps_per_epoch = min(len(self.sampler), config.max_iters_per_epoch or len(self.sampler))
        self.state_path: str | None = None  # named in a NonFiniteLossError
        self._xbuf: torch.Tensor | None = None

    def identity(self) -> dict[str, Any]:
        config = self.config.model_dump(mode="json", exclude=_RESUME_FREE_FIELDS)
        return {"config": config, "data": self.data_fp, "precision": self.spec.precision}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.model.state_tensors()

    def load_state_tensors(self, tensors, source: str) -> None:
        self.model.load_state_tensors(tensors, source=source)

    def _input(self, idx: torch.Tensor, params=None) -> torch.Tensor:
        images = self.cache.fetch(idx, self.spec.device)
        params = params if params is not None else self.transform.sample_params(idx.numel())
        if self.spec.device.type != "cpu":
            return self.transform.apply(images, params)
        # reuse one output buffer: a fresh 25 MB tensor per batch costs page faults on the CPU;
        # the previous batch is no longer needed once its backward pass has run.
        if self._xbuf is None or self._xbuf.shape[0] != idx.numel():
            self._xbuf = torch.empty(idx.numel(), 3, *self.config.input_size)
        return self.transform.apply(images, params, out=self._xbuf)

    def run_epoch(self, epoch: int, log: Callable[[str], None]) -> dict[str, float]:
        config, spec = self.config, self.spec
        lr = stage2_lr(epoch, config)
        set_lr(self.optimizer, lr)
        self.net.train()
        keys = (*LOSS_TERMS, "acc", "id_acc")
        sums = dict.fromkeys(keys, 0.0)
        n_steps, n_images = 0, 0
        for step, batch in enumerate(self.sampler, start=1):
            if step > self.steps_per_epoch:
                break
            idx = torch.tensor(batch, dtype=torch.long)
            par, triplet = self.parallel, {}
            if par is None:
                x = self._input(idx)
            else:  # this rank's slice of the global batch, augmented as one process would
                lo, hi = par.bounds(idx.numel())
                x = self._input(idx[lo:hi], shard_augment_params(self.transform.sample_params(idx.numel()), lo, hi))
                triplet["triplet_labels"] = self.labels[idx.to(spec.device)]
                idx = idx[lo:hi]
            idx_dev = idx.to(spec.device)
            target = self.labels[idx_dev]
            cams = self.cams[idx_dev] if self.cams is not None else None
            with spec.autocast():
                logits, feats, proj = self.net(x, cams)
            if par is not None:
                triplet["triplet_feats"] = [par.gather(f) for f in feats]
            out = self.criterion(logits, feats, proj, self.text, target, **triplet)
            with torch.no_grad():
                acc = (out.i2t_logits.argmax(dim=1) == target).float().mean()
                id_acc = (logits[0].argmax(dim=1) == target).float().mean()
                values = torch.stack([out.total.detach(), out.id.detach(), out.triplet.detach(), out.i2t.detach(),
                                      acc, id_acc]).float()
                values = (par.mean(values) if par is not None else values).tolist()
            terms = dict(zip(keys, values))
            if not all(math.isfinite(v) for v in values[:4]):
                where = self.state_path if self.state_path and Path(self.state_path).is_file() else None
                raise NonFiniteLossError(
                    f"stage 2: non-finite loss at epoch {epoch}, step {step}/{self.steps_per_epoch} "
                    f"(loss={terms['loss']}, id={terms['id']}, triplet={terms['triplet']}, i2t={terms['i2t']}); "
                    f"stopped without saving — last good checkpoint: {where or 'none'}",
                    epoch=epoch, step=step, terms={k: terms[k] for k in LOSS_TERMS}, checkpoint=where,
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(out.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for k, v in terms.items():
                sums[k] += v
            n_steps += 1
            n_images += int(idx.numel()) * (par.world_size if par is not None else 1)
            if step % config.log_period == 0:
                log(f"stage 2 epoch {epoch} iter {step}/{self.steps_per_epoch}: loss {terms['loss']:.4f}, "
                    f"acc {terms['acc']:.3f}, lr {lr:.2e}")
        if spec.device.type == "cuda":
            torch.cuda.synchronize(spec.device)
        if n_steps == 0:
            raise ValueError("stage 2: the P×K sampler produced no batch (too few identities or images)")
        return {**{k: v / n_steps for k, v in sums.items()}, "lr": float(lr), "samples": n_images, "steps": n_steps}


def train_visual_encoder(
    model: ReIDModel,
    text_features: torch.Tensor,
    cache: ImageCache,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    camids: Sequence[int] | np.ndarray | torch.Tensor | None,
    config: Stage2Config,
    device_spec: DeviceSpec,
    state_path: str | os.PathLike | None = None,
    on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None,
    log: Callable[[str], None] | None = None,
    hooks: RankHooks | None = None,
    parallel: Parallel | None = None,
) -> Stage2Result:
    """Run (or resume) stage 2 on ``cache`` with ``labels`` (0..C-1) and frozen ``text_features``.

    ``camids`` (0-based) are needed when the model has SIE, otherwise ignored. ``state_path``,
    ``on_epoch_end`` (``True`` stops after that epoch's checkpoint), ``log`` and ``hooks``: as in
    :func:`~reid_pipeline.training.loop.run_training`; history rows carry ``id``, ``triplet``,
    ``i2t``, ``acc`` and ``id_acc`` besides the common fields. ``parallel``: run as one rank of a
    ``torch.distributed`` job (:mod:`reid_pipeline.training.distributed`): P×K is the global batch,
    the result equals one process's (with ``sync_bn``); its hooks are used unless ``hooks`` is given.
    """
    labels_t = _as_long(labels, "labels")
    cam_t = _as_long(camids, "camids") if camids is not None else None
    text_features = text_features.detach()
    num_classes = _validate(model, text_features, cache, labels_t, cam_t, config)
    stage = _EncoderStage(model, text_features, cache, labels_t, cam_t, num_classes, config, device_spec, parallel)
    if parallel is not None and hooks is None:
        hooks = parallel.hooks()
    stage.state_path = str(state_path) if state_path is not None else None
    if log is not None:
        log(f"stage 2: {len(cache)} images, {num_classes} identities, {config.ids_per_batch}x{config.instances_per_id} "
            f"batches (~{stage.steps_per_epoch}/epoch), {config.epochs} epochs, {device_spec.precision} on {device_spec.device}")
    loop = run_training(stage, state_path=state_path, checkpoint_every=config.checkpoint_every, on_epoch_end=on_epoch_end,
                        log=log, log_terms=("id", "triplet", "i2t", "acc", "id_acc"), hooks=hooks)
    model.eval()
    final = loop.history[-1] if loop.history else {}
    return Stage2Result(**vars(loop), final_accuracy=float(final.get("acc", float("nan"))),
                        final_id_accuracy=float(final.get("id_acc", float("nan"))), precision=device_spec.precision)
