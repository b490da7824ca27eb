"""CLIP-style contrastive image–caption pre-training of a ``clip.model.CLIP`` on a captioned image folder.

Input: a folder of images and a captions file in JSON lines, one object a line with ``image`` (path
relative to the folder) and ``caption``, optionally ``pid`` (an integer group: images of one person,
object or scene; -1 = none). Output: the trained CLIP, saved in OpenAI's format with
:func:`reid_pipeline.model.clip_loader.save_clip_archive` so that ``clip.load(path)`` reads it.

Recipe (CLIP's): image and text features L2-normalised, logits ``exp(t) · cos`` with a learned
temperature ``t`` (clamped at ln 100), cross-entropy image→text and text→image averaged; AdamW with
weight decay on matrices only, linear warm-up then cosine decay, per step. Captions whose images share
a ``pid`` are all counted as matches in a batch (their targets are spread evenly over them).

Images are trained at ``config.input_size`` (H, W), which need not be the model's square resolution:
the ViT's positional embedding stays a square grid (OpenAI's format) and is resized bilinearly to the
input's patch grid in every forward, exactly as :func:`~reid_pipeline.model.clip_loader.adapt_visual`
resizes it after loading, so the saved model behaves at ``input_size`` as it did in training.

Feature scale: CLIP's loss sees only normalised features, so the length of the raw features is left
arbitrary by training (here about 16), while CLIP-ReID's stage-1 and stage-2 losses use raw dot
products between image and text features (temperature 1): the raw scale acts as their temperature, and
at 16 × 16 their softmaxes saturate. With ``config.calibrate_feature_scale`` the trained model's two
output projections are rescaled after training so that the mean raw image and caption feature lengths
(over training samples) are both ``sqrt(exp(t))``: a raw image–text dot product then equals, on
average, the logit CLIP was trained with (``exp(t) · cos``). Normalised features, hence retrieval and
anything computed on them, are unchanged (:func:`calibrate_feature_scale`).

Output projections: trained freely, each tower's last matrix keeps only the directions the captions
use (on the embedded CLIP its text projection's singular values fell from 0.51 to 0.002), and stage 1's
prompts, which must reach every identity's image features through the frozen text tower, cannot steer
into the rest. ``config.orthogonal_projections`` keeps both projections orthogonal during training
(``torch.nn.utils.parametrizations.orthogonal``; square projections only), saved as plain matrices.
``config.logit_scale_lr`` gives the temperature its own peak learning rate: at the main 5e-4, a few
hundred Adam steps move it by at most ~0.3 from CLIP's initial ``ln(1/0.07)``.

Held-out groups (``config.holdout_fraction`` of the pids, never trained on) measure zero-shot
retrieval after training: each held-out image ranks the captions of all held-out images; a hit is a
top caption of the image's own group (:func:`retrieval_accuracy`; ``chance`` is the hit rate of a
random ranking). Seeded: shuffling, augmentation and the split follow ``config.seed`` (bit-for-bit on
one CPU with one thread count).

Command line::

    python -m reid_pipeline.training.clip_pretrain ROOT INIT_WEIGHTS OUT [--captions FILE] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from tqdm import tqdm

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.sampler import PKSampler
from reid_pipeline.data.transforms import (
    TestTransform,
    TrainTransform,
    normalization_for,
)
from reid_pipeline.device import DeviceSpec, resolve_device
from reid_pipeline.model.clip_loader import (
    _resize_pos,
    import_clip,
    save_clip_archive,
    visual_grid,
)
from reid_pipeline.model.prompt import TextEncoder
from reid_pipeline.training.schedulers import warmup_cosine_lr

__all__ = [
    "CaptionRecord",
    "CaptionsError",
    "PretrainConfig",
    "PretrainResult",
    "calibrate_feature_scale",
    "encode_captions",
    "encode_images",
    "pretrain_clip",
    "pretrain_clip_folder",
    "read_captions",
    "retrieval_accuracy",
]

MAX_LOGIT_SCALE = math.log(100.0)


class CaptionsError(ValueError):
    """A captions file that is missing, malformed or names images that do not exist."""


@dataclass(frozen=True)
class CaptionRecord:
    image: str
    caption: str
    pid: int = -1


class PretrainConfig(BaseModel):
    """Hyper-parameters of :func:`pretrain_clip`; the defaults train the embedded small CLIP."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    warmup_lr_init: float = Field(1e-5, ge=0)
    min_lr: float = Field(1e-5, ge=0)
    input_size: tuple[int, int] = Field((128, 64), description="(H, W) the images are trained at")
    flip_p: float = Field(0.5, ge=0, le=1)
    pad: int = Field(4, ge=0, description="pad-and-random-crop augmentation, pixels")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="share of pids held out for zero-shot retrieval")
    instances_per_group: int = Field(
        4, ge=1, description="K: batches of batch_size/K pids × K of their images (P×K sampling) when the captions "
                             "carry pids; 1 = plain random batches")
    calibrate_feature_scale: bool = Field(
        True, description="rescale the output projections after training so that raw image-text dot products equal "
                          "exp(t)·cos on average (CLIP-ReID's losses use raw dot products); normalised features unchanged")
    logit_scale_lr: float | None = Field(
        None, gt=0, description="peak learning rate of the temperature (CLIP's log logit scale), on the same warm-up "
                                "and cosine schedule; None = lr. Over a few hundred steps at lr 5e-4 Adam moves it by "
                                "at most ~0.3, so it stays near CLIP's initial 1/0.07")
    orthogonal_projections: bool = Field(
        False, description="keep the image and text output projections orthogonal while training "
                           "(torch.nn.utils.parametrizations.orthogonal; saved as plain matrices). Left free, a "
                           "caption-trained projection shrinks the directions the captions do not use, which "
                           "stage 1's prompts cannot reach afterwards; the loss sees normalised features, so an "
                           "orthogonal projection loses it nothing but a rotation the towers learn anyway")
    seed: int = 0


@dataclass
class PretrainResult:
    """What :func:`pretrain_clip` returns; ``model`` is the trained CLIP (eval mode, on the CPU)."""

    model: nn.Module
    loss_per_epoch: list[float]
    retrieval: dict[str, float]
    wall_time_s: float
    samples_per_s: float
    train_images: int
    holdout_images: int
    history: list[dict[str, float]] = field(default_factory=list)
    #: :func:`calibrate_feature_scale`'s report (empty when not calibrated)
    feature_scale: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        r = self.retrieval
        text = (
            f"CLIP pre-training: {len(self.loss_per_epoch)} epochs on {self.train_images} images in "
            f"{self.wall_time_s:.0f} s ({self.samples_per_s:.0f} img/s); loss {self.loss_per_epoch[0]:.3f} → "
            f"{self.loss_per_epoch[-1]:.3f}"
        )
        if r:
            text += (
                f"; zero-shot image→caption top-1 on {self.holdout_images} held-out images: "
                f"{r['image_to_caption_top1']:.3f} (chance {r['chance']:.3f}), "
                f"caption→image top-1 {r['caption_to_image_top1']:.3f}"
            )
        if self.feature_scale:
            s = self.feature_scale
            text += (f"; raw feature lengths image {s['image_norm']:.2f} / caption {s['text_norm']:.2f} rescaled to "
                     f"{s['target_norm']:.2f} (= sqrt of the logit scale {s['logit_scale']:.2f})")
        return text


# ---------------------------------------------------------------------------------------------
# captions


def read_captions(root: str | os.PathLike, captions_file: str | os.PathLike | None = None) -> list[CaptionRecord]:
    """Read and check the captions file (default ``root / "captions.jsonl"``)."""
    root = Path(root)
    path = Path(captions_file) if captions_file is not None else root / "captions.jsonl"
    if not path.is_file():
        raise CaptionsError(f"captions file {path} does not exist (expected JSON lines with 'image' and 'caption')")
    records: list[CaptionRecord] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise CaptionsError(f"{path}:{n}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("caption"), str):
            raise CaptionsError(f"{path}:{n}: expected an object with string fields 'image' and 'caption', got {line[:120]!r}")
        if not obj["caption"].strip():
            raise CaptionsError(f"{path}:{n}: empty caption for {obj['image']!r}")
        pid = obj.get("pid", -1)
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise CaptionsError(f"{path}:{n}: 'pid' must be an integer, got {pid!r}")
        if not (root / obj["image"]).is_file():
            raise CaptionsError(f"{path}:{n}: image {obj['image']!r} not found under {root}")
        records.append(CaptionRecord(obj["image"], obj["caption"], pid))
    if len(records) < 2:
        raise CaptionsError(f"{path}: {len(records)} captions; contrastive pre-training needs at least 2")
    return records


def _tokenize(captions: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (N, context_length) and the end-of-text position of each caption."""
    clip = import_clip()
    tokens = clip.tokenize(list(captions), context_length=context_length, truncate=True)
    return tokens, tokens.argmax(dim=-1)  # the end-of-text token has the largest id


# ---------------------------------------------------------------------------------------------
# the two towers at the training input size


def _vit_image_features(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """openai-clip's ``VisionTransformer.forward`` with the positional embedding resized to ``x``'s grid."""
    patch = visual.conv1.kernel_size[0]
    stride = visual.conv1.stride[0]
    grid = visual_grid((x.shape[-2], x.shape[-1]), patch, stride)
    pos = visual.positional_embedding
    side = round((pos.shape[0] - 1) ** 0.5)
    if side * side + 1 != pos.shape[0]:
        raise ValueError("pre-training expects an unadapted CLIP (square positional grid), as clip.load returns it")
    if (side, side) != grid:
        pos = _resize_pos(pos, (side, side), grid)
    y = visual.conv1(x.type(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
    cls_tok = visual.class_embedding.to(y.dtype).expand(y.shape[0], 1, -1)
    y = torch.cat([cls_tok, y], dim=1) + pos.to(y.dtype)
    y = visual.transformer(visual.ln_pre(y).permute(1, 0, 2)).permute(1, 0, 2)
    return visual.ln_post(y[:, 0]) @ visual.proj


def _image_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model.visual, "class_embedding"):
        return _vit_image_features(model.visual, x)
    return model.encode_image(x)  # ResNet: its attention pool needs the model's square input size


def _text_features(
    model: nn.Module, text_encoder: TextEncoder, tokens: torch.Tensor, eot: torch.Tensor, embedding: nn.Module | None = None
) -> torch.Tensor:
    """``model.encode_text`` on the context cut after the batch's longest caption (exact: causal).

    ``embedding``: a token embedding to use instead of the model's (see :class:`_UsedTokens`)."""
    length = int(eot.max()) + 1
    body = (embedding or model.token_embedding)(tokens[:, :length]).type(model.positional_embedding.dtype)
    return text_encoder.encode(body, eot)


class _UsedTokens(nn.Module):
    """The rows of CLIP's token embedding that the captions use, as their own parameter.

    Captions use a few hundred of CLIP's 49 408 tokens; the other rows get zero gradients, which leave
    them unchanged under Adam(W) without weight decay on embeddings. Training only the used rows is
    therefore the same computation minus a dense 49 408-row gradient and optimizer update per step.
    """

    def __init__(self, embedding: nn.Embedding, tokens: torch.Tensor):
        super().__init__()
        self.ids = torch.unique(tokens)
        remap = torch.full((embedding.num_embeddings,), -1, dtype=torch.long)
        remap[self.ids] = torch.arange(len(self.ids))
        self.register_buffer("remap", remap, persistent=False)
        self.weight = nn.Parameter(embedding.weight.detach()[self.ids].clone())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[tokens], self.weight)

    @torch.no_grad()
    def write_back(self, embedding: nn.Embedding) -> None:
        embedding.weight[self.ids.to(embedding.weight.device)] = self.weight.to(embedding.weight.dtype)


@torch.no_grad()
def encode_images(
    model: nn.Module, cache: ImageCache, transform: Callable, spec: DeviceSpec, batch_size: int = 256
) -> torch.Tensor:
    """L2-normalised image features (N, D) of every cached image, float32 on the CPU."""
    out = []
    for start in range(0, len(cache), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(cache)))
        with spec.autocast():
            out.append(F.normalize(_image_features(model, transform(cache.fetch(idx, spec.device))).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_captions(model: nn.Module, captions: Sequence[str], spec: DeviceSpec, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised text features (N, D) of ``captions``, float32 on the CPU."""
    tokens, eot = _tokenize(captions, int(model.positional_embedding.shape[0]))
    text_encoder = TextEncoder(model)
    out = []
    for start in range(0, len(captions), batch_size):
        t, e = tokens[start : start + batch_size].to(spec.device), eot[start : start + batch_size].to(spec.device)
        with spec.autocast():
            out.append(F.normalize(_text_features(model, text_encoder, t, e).float(), dim=-1).cpu())
    return torch.cat(out)


def retrieval_accuracy(
    image_features: torch.Tensor, text_features: torch.Tensor, groups: Sequence[int] | torch.Tensor
) -> dict[str, float]:
    """Top-1 retrieval between images and captions (row ``i`` of both describes the same image).

    A hit is a best match from the same group (``groups[i]``; give each row its own group to require
    the exact caption). Returns ``image_to_caption_top1``, ``caption_to_image_top1`` and ``chance``
    (the expected hit rate of a random pick: the mean share of rows in one's own group).
    """
    g = torch.as_tensor(np.array(groups), dtype=torch.long)
    if image_features.shape[0] != text_features.shape[0] or g.numel() != image_features.shape[0]:
        raise ValueError(
            f"need one text feature and one group per image, got {image_features.shape[0]} images, "
            f"{text_features.shape[0]} texts, {g.numel()} groups"
        )
    sim = image_features.float() @ text_features.float().T
    same = g[:, None] == g[None, :]
    i2t = same[torch.arange(len(g)), sim.argmax(dim=1)].float().mean()
    t2i = same[torch.arange(len(g)), sim.argmax(dim=0)].float().mean()
    return {
        "image_to_caption_top1": float(i2t),
        "caption_to_image_top1": float(t2i),
        "chance": float(same.float().mean(dim=1).mean()),
        "num_images": float(len(g)),
    }


# ---------------------------------------------------------------------------------------------
# training


def _split(records: Sequence[CaptionRecord], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of training and held-out records; whole pids are held out (records with pid -1 train)."""
    pids = sorted({r.pid for r in records if r.pid >= 0})
    n_hold = round(fraction * len(pids))
    if fraction > 0 and len(pids) >= 4:
        n_hold = max(2, n_hold)
    else:
        n_hold = 0
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC11F]))
    held = set(rng.choice(pids, size=n_hold, replace=False).tolist()) if n_hold else set()
    train = [i for i, r in enumerate(records) if r.pid not in held]
    hold = [i for i, r in enumerate(records) if r.pid in held]
    return train, hold


def _param_groups(model: nn.Module, used: _UsedTokens, weight_decay: float, lr: float,
                  logit_scale_lr: float | None = None) -> list[dict[str, Any]]:
    """AdamW's groups; each carries ``peak_lr``, the top of its schedule."""
    decay, no_decay, temperature = [], [used.weight], []
    for name, p in model.named_parameters():
        if not p.requires_grad or name == "token_embedding.weight":
            continue
        if name == "logit_scale" and logit_scale_lr is not None:
            temperature.append(p)
            continue
        # CLIP's rule: decay weight matrices; not gains, biases, embeddings or the temperature.
        (decay if p.dim() >= 2 and "embedding" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "peak_lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "peak_lr": lr}]
    if temperature:
        groups.append({"params": temperature, "weight_decay": 0.0, "peak_lr": logit_scale_lr})
    return groups


def _projection_sites(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, tensor name) of ``model``'s image and text output projections."""
    visual = model.visual
    if hasattr(visual, "proj") and visual.proj is not None:  # ViT
        return [(model, "text_projection"), (visual, "proj")]
    return [(model, "text_projection"), (visual.attnpool.c_proj, "weight")]  # ResNet's attention pool


def _orthogonalise(model: nn.Module) -> None:
    """Register torch's orthogonal parametrisation on both (square) output projections.

    Square only: on the ResNet's 128×512 attention-pool projection an AdamW step under the
    parametrisation returned a zero matrix (torch 2.14.1, with and without its trivialisation)."""
    sites = _projection_sites(model)
    shapes = {name: tuple(getattr(module, name).shape) for module, name in sites}
    if any(len(set(shape)) != 1 for shape in shapes.values()):
        raise ValueError("orthogonal_projections needs square output projections (tower width = embed_dim), got "
                         + ", ".join(f"{name} {shape}" for name, shape in shapes.items()))
    for module, name in sites:
        parametrizations.orthogonal(module, name)


def _plain_projections(model: nn.Module, text_encoder: TextEncoder) -> None:
    """Undo :func:`_orthogonalise`, keeping the trained (orthogonal) matrices as plain parameters."""
    for module, name in _projection_sites(model):
        if parametrize.is_parametrized(module, name):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    text_encoder.text_projection = model.text_projection


@torch.no_grad()
def calibrate_feature_scale(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, eot: torch.Tensor,
                            spec: DeviceSpec, batch_size: int = 256) -> dict[str, float]:
    """Rescale ``model``'s image and text output projections (in place) so that the mean raw feature
    length of ``images`` (preprocessed, ``(N, 3, H, W)``) and of the captions ``tokens`` is
    ``sqrt(exp(logit_scale))`` for both: raw dot products then average CLIP's trained logits
    ``exp(t) · cos``. Each projection is linear, so normalised features do not change.

    Returns the mean lengths before (``image_norm``, ``text_norm``), ``target_norm`` and ``logit_scale``.
    """
    if images.shape[0] == 0 or tokens.shape[0] == 0:
        raise ValueError("calibrate_feature_scale needs at least one image and one caption")
    text_encoder = TextEncoder(model)
    img_norms, txt_norms = [], []
    for start in range(0, images.shape[0], batch_size):
        with spec.autocast():
            img_norms.append(_image_features(model, images[start : start + batch_size].to(spec.device)).float().norm(dim=-1))
    for start in range(0, tokens.shape[0], batch_size):
        t, e = tokens[start : start + batch_size].to(spec.device), eot[start : start + batch_size].to(spec.device)
        with spec.autocast():
            txt_norms.append(_text_features(model, text_encoder, t, e).float().norm(dim=-1))
    image_norm, text_norm = float(torch.cat(img_norms).mean()), float(torch.cat(txt_norms).mean())
    logit_scale = float(model.logit_scale.detach().float().exp())
    target = math.sqrt(logit_scale)
    visual = model.visual
    if hasattr(visual, "proj") and visual.proj is not None:  # ViT: features = ln_post(cls) @ proj
        visual.proj.mul_(target / image_norm)
    else:  # ResNet: the attention pool's output projection (weight and bias)
        visual.attnpool.c_proj.weight.mul_(target / image_norm)
        visual.attnpool.c_proj.bias.mul_(target / image_norm)
    model.text_projection.mul_(target / text_norm)
    return {"image_norm": image_norm, "text_norm": text_norm, "target_norm": target, "logit_scale": logit_scale}


def _targets(groups: torch.Tensor) -> torch.Tensor:
    """Row-normalised match matrix: row i spreads its target over the batch items of its group."""
    same = (groups[:, None] == groups[None, :]) & (groups[:, None] >= 0)
    same |= torch.eye(len(groups), dtype=torch.bool, device=groups.device)
    same = same.float()
    return same / same.sum(dim=1, keepdim=True)


def pretrain_clip(
    model: nn.Module,
    root: str | os.PathLike,
    records: Sequence[CaptionRecord],
    config: PretrainConfig | None = None,
    device_spec: DeviceSpec | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PretrainResult:
    """Train ``model`` (a ``clip.model.CLIP``, modified in place) on ``records`` under ``root``."""
    cfg = config or PretrainConfig()
    spec = device_spec or resolve_device("cpu", "fp32")
    if not records:
        raise CaptionsError("no caption records given")
    arch = "vit" if hasattr(model.visual, "class_embedding") else "resnet"
    size = tuple(int(v) for v in cfg.input_size)
    if arch == "resnet" and size != (model.visual.input_resolution,) * 2:
        raise ValueError(
            f"a ResNet CLIP pre-trains at its own square size {model.visual.input_resolution}, got input_size {size}"
        )
    train_idx, hold_idx = _split(records, cfg.holdout_fraction, cfg.seed)
    if len(train_idx) < 2:
        raise CaptionsError(f"only {len(train_idx)} training captions after holding out {len(hold_idx)}")
    t0 = time.perf_counter()
    rels = [records[i].image for i in train_idx]
    cache = ImageCache.from_paths(root, rels).to(spec.device)
    mean, std = normalization_for(arch)
    transform = TrainTransform(size, flip_p=cfg.flip_p, pad=cfg.pad, erase_p=0.0, mean=mean, std=std, seed=cfg.seed)
    context = int(model.positional_embedding.shape[0])
    tokens, eot = _tokenize([records[i].caption for i in train_idx], context)
    groups = torch.tensor([records[i].pid for i in train_idx], dtype=torch.long)

    model.to(spec.device).float().train()
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.orthogonal_projections:
        _orthogonalise(model)
    text_encoder = TextEncoder(model)
    used = _UsedTokens(model.token_embedding, tokens).to(spec.device)
    opt = torch.optim.AdamW(_param_groups(model, used, cfg.weight_decay, cfg.lr, cfg.logit_scale_lr), lr=cfg.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    scaler = spec.grad_scaler()
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(train_idx)
    sampler = None
    if cfg.instances_per_group > 1 and bool((groups >= 0).any()):
        if cfg.batch_size % cfg.instances_per_group:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of instances_per_group {cfg.instances_per_group}")
        # records without a pid form groups of their own (their K slots repeat the image, augmented anew)
        sample_ids = torch.where(groups >= 0, groups, -2 - torch.arange(n))
        sampler = PKSampler(sample_ids, p=cfg.batch_size // cfg.instances_per_group, k=cfg.instances_per_group,
                            generator=gen)
        steps_per_epoch = max(1, len(sampler))
    else:
        steps_per_epoch = max(1, n // cfg.batch_size)  # full batches only: every step sees batch_size negatives
    total = steps_per_epoch * cfg.epochs
    # warmup_cosine_lr is evaluated at the fractional epoch: the schedule advances every step.
    losses: list[float] = []
    history: list[dict[str, float]] = []
    bar = tqdm(total=total, desc="CLIP pre-training", unit="step", disable=not progress, leave=True)
    step = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            if sampler is not None:
                batches = [torch.as_tensor(b, dtype=torch.long) for b in sampler][:steps_per_epoch]
            else:
                perm = torch.randperm(n, generator=gen)
                batches = [perm[b * cfg.batch_size : (b + 1) * cfg.batch_size] for b in range(steps_per_epoch)]
            run, count = 0.0, 0
            for idx in batches:
                lr = warmup_cosine_lr(
                    step / steps_per_epoch, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr_init, cfg.min_lr
                )
                for grp in opt.param_groups:
                    grp["lr"] = lr * grp["peak_lr"] / cfg.lr
                images = transform(cache.fetch(idx, spec.device))
                t, e = tokens[idx].to(spec.device), eot[idx].to(spec.device)
                if cfg.orthogonal_projections:  # the parametrised matrix, recomputed from its parameter each step
                    text_encoder.text_projection = model.text_projection
                with spec.autocast():
                    img = F.normalize(_image_features(model, images).float(), dim=-1)
                    txt = F.normalize(_text_features(model, text_encoder, t, e, used).float(), dim=-1)
                    logits = model.logit_scale.exp() * img @ txt.T
                    target = _targets(groups[idx].to(spec.device))
                    loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                                  + torch.sum(-target.T * F.log_softmax(logits.T, 1), 1).mean())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"CLIP pre-training loss became {float(loss)} at epoch {epoch}, step {step}")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
                run += float(loss.detach())
                count += 1
                step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{run / count:.3f}", lr=f"{lr:.1e}")
            losses.append(run / count)
            elapsed = time.perf_counter() - t0
            history.append({"epoch": epoch, "loss": losses[-1], "lr": lr, "temperature": float(model.logit_scale.detach().exp())})
            if log is not None and not progress:
                log(f"CLIP pre-training epoch {epoch}/{cfg.epochs}: loss {losses[-1]:.4f}, lr {lr:.2e}, "
                    f"{elapsed:.0f} s")
    finally:
        bar.close()
        _plain_projections(model, text_encoder)
    used.write_back(model.token_embedding)
    train_time = time.perf_counter() - t0
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)

    feature_scale: dict[str, float] = {}
    if cfg.calibrate_feature_scale:
        # a fixed, seeded sample of training images (unaugmented) and their captions
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[:512]
        sample = TestTransform(size, mean, std)(cache.fetch(pick, spec.device))
        feature_scale = calibrate_feature_scale(model, sample, tokens[pick], eot[pick], spec)
    retrieval: dict[str, float] = {}
    if hold_idx:
        held = ImageCache.from_paths(root, [records[i].image for i in hold_idx]).to(spec.device)
        img = encode_images(model, held, TestTransform(size, mean, std), spec)
        txt = encode_captions(model, [records[i].caption for i in hold_idx], spec)
        retrieval = retrieval_accuracy(img, txt, [records[i].pid for i in hold_idx])
    result = PretrainResult(
        model=model.cpu(), loss_per_epoch=losses, retrieval=retrieval, wall_time_s=train_time,
        samples_per_s=step * cfg.batch_size / max(train_time, 1e-9), train_images=n, holdout_images=len(hold_idx),
        history=history, feature_scale=feature_scale,
    )
    if log is not None:
        log(result.summary())
    return result


def pretrain_clip_folder(
    root: str | os.PathLike,
    model: nn.Module,
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    captions_file: str | os.PathLike | None = None,
    device_spec: DeviceSpec | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    extra_meta: dict[str, Any] | None = None,
) -> PretrainResult:
    """Pre-train ``model`` on the captioned folder ``root`` and save it at ``out`` in OpenAI's format
    (a TorchScript archive ``clip.load(out)`` reads), with the run's summary (and ``extra_meta``) in
    ``out`` + ``.json``."""
    records = read_captions(root, captions_file)
    cfg = config or PretrainConfig()
    result = pretrain_clip(model, root, records, cfg, device_spec, progress=progress, log=log)
    from reid_pipeline.storage import write_json

    save_clip_archive(result.model, out)
    write_json(Path(str(out) + ".json"), {
        "format": "openai-clip TorchScript archive (clip.load)",
        "captions": str(Path(captions_file) if captions_file else Path(root) / "captions.jsonl"),
        "config": cfg.model_dump(mode="json"),
        "loss_per_epoch": result.loss_per_epoch,
        "retrieval": result.retrieval,
        "train_images": result.train_images,
        "holdout_images": result.holdout_images,
        "wall_time_s": result.wall_time_s,
        "feature_scale": result.feature_scale,
        **(extra_meta or {}),
    })
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_pipeline.training.clip_pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder of images")
    parser.add_argument("init", help="CLIP to start from: a checkpoint path or an openai-clip model name")
    parser.add_argument("out", help="where to save the trained CLIP (OpenAI's TorchScript format)")
    parser.add_argument("--captions", default=None, help="captions file (default ROOT/captions.jsonl)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--input-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                                   "input_size": args.input_size, "seed": args.seed}.items() if v is not None}
    clip = import_clip()
    model, _ = clip.load(args.init, device="cpu", jit=False)
    try:
        pretrain_clip_folder(args.root, model.float(), args.out, PretrainConfig(**overrides), captions_file=args.captions,
                             device_spec=resolve_device(args.device))
    except CaptionsError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
