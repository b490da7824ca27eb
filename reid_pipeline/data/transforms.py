"""Batched image transforms on uint8 tensors, with CLIP-ReID's train/test semantics.

CLIP-ReID's stage-2 train transform (``datasets/make_dataloader_clipreid.py``) is, per sample::

    Resize((256, 128), BICUBIC) → RandomHorizontalFlip(0.5) → Pad(10) → RandomCrop((256, 128))
    → ToTensor → Normalize(mean, std) → timm RandomErasing(p=0.5, mode='pixel', max_count=1)

and its test transform ``Resize((256, 128))`` (torchvision's default, *bilinear*) → ToTensor →
Normalize. :class:`TrainTransform` and :class:`TestTransform` do the same on a whole uint8 batch
``(B, 3, h, w)`` at once, on whatever device the batch is on:

* **resize** — ``F.interpolate(..., antialias=True)``, whose kernels are PIL's (bicubic a = -0.5,
  support widened when shrinking). On the CPU it runs on uint8 (separable, horizontal pass first,
  uint8 in between, as PIL does): bit-identical to PIL's ``Image.resize`` when enlarging (Market's
  128×64 → 256×128), within one grey level when shrinking (fixed-point rounding). Elsewhere (CUDA
  has no uint8 kernel) it runs the two passes in float32 with rounding and clamping to 0..255 after
  each, which matches PIL to ±1 grey level. Images whose size already equals the target are not
  touched (PIL copies them too).
* **flip + pad + crop** — fused into one index computation per sample: output pixel ``(y, x)`` reads
  resized pixel ``(y + top - pad, x' )`` with ``x' = x + left - pad`` or, when flipped,
  ``W - 1 - x'``; out-of-range reads are the zero padding. CPU: a loop over the batch of cheap
  slice copies written straight into the float32 output (measured 3× faster than ``gather`` or
  ``unfold`` there); CUDA: two vectorised ``gather`` calls. Both produce identical results.
* **normalise** — ``x / 255``, then ``(x - mean) / std`` per channel, in float32: the same ops as
  ``ToTensor`` + ``Normalize``, so results agree bit for bit on the CPU.
* **random erasing** — timm's ``RandomErasing(probability=0.5, mode='pixel', max_count=1)`` as
  CLIP-ReID uses it: with probability p, up to 10 attempts to draw a box of area
  U(0.02, 1/3)·H·W and aspect ratio exp(U(log 0.3, log 1/0.3)), ``h = round(sqrt(area·r))``,
  ``w = round(sqrt(area/r))``, accepted if ``h < H`` and ``w < W``, placed uniformly; the box is
  filled with per-pixel, per-channel N(0, 1) values (in normalised units). The first valid attempt
  is used; if none of the 10 is valid the image is not erased. (Not the older Zhong et al.
  RandomErasing with area 0.02–0.4 and 100 tries, which CLIP-ReID's code has commented out.)

On the CPU, pass a reusable float32 ``out`` buffer to :meth:`TrainTransform.apply`/``__call__``:
a fresh 25 MB tensor per batch costs more in page faults than the normalisation itself.

All random parameters are drawn up front (:meth:`TrainTransform.sample_params`) from one CPU
``torch.Generator``, vectorised; the erase noise comes from a generator on the batch's device seeded
from that same generator. A run is therefore a pure function of the seed, and
:meth:`TrainTransform.apply` is a pure function of ``(images, params)``.

:class:`ReferenceTrainTransform` / :class:`ReferenceTestTransform` are the per-sample
PIL/torchvision pipelines with the same semantics, used by the tests and by
``benchmarks/input_pipeline.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "CLIP_VIT_MEAN",
    "CLIP_VIT_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "normalization_for",
    "resize_uint8",
    "flip_pad_crop",
    "normalize",
    "AugmentParams",
    "TrainTransform",
    "TestTransform",
]

# CLIP-ReID configs/person/vit_clipreid.yml and cnn_clipreid.yml (PIXEL_MEAN / PIXEL_STD).
CLIP_VIT_MEAN = (0.5, 0.5, 0.5)
CLIP_VIT_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm RandomErasing defaults, as CLIP-ReID constructs it.
ERASE_MIN_AREA = 0.02
ERASE_MAX_AREA = 1.0 / 3.0
ERASE_MIN_ASPECT = 0.3
ERASE_ATTEMPTS = 10

_PIL_MODES = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def normalization_for(arch: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` that CLIP-ReID uses: 0.5/0.5 for ViT, ImageNet statistics for ResNet."""
    if arch == "vit":
        return CLIP_VIT_MEAN, CLIP_VIT_STD
    if arch == "resnet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(f"arch must be 'vit' or 'resnet', got {arch!r}")


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
        raise ValueError(f"size must be (height, width) with positive entries, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _resize_float_pil_like(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Two separable float passes, rounding to uint8 between them as PIL does."""
    h, w = x.shape[-2:]
    y = x.float()
    if w != size[1]:
        y = F.interpolate(y, size=(h, size[1]), mode=mode, antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255)
    if h != size[0]:
        y = F.interpolate(y, size=(size[0], size[1]), mode=mode, antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255)
    return y.to(torch.uint8)


def _resize_group(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if x.device.type == "cpu":
        return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return _resize_float_pil_like(x, size, mode)


def resize_uint8(
    images: torch.Tensor | Sequence[torch.Tensor], size: Sequence[int], interpolation: str = "bicubic"
) -> torch.Tensor:
    """Resize a uint8 batch ``(B, 3, h, w)`` — or a list of ``(3, h_i, w_i)`` images — to ``size``.

    A list is grouped by stored size and each group resized in one call; the result keeps the
    list's order. Returns a uint8 ``(B, 3, H, W)`` tensor. See the module docstring for how this
    compares with PIL.
    """
    size = _check_size(size)
    if interpolation not in _PIL_MODES:
        raise ValueError(f"interpolation must be one of {sorted(_PIL_MODES)}, got {interpolation!r}")
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (B, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        return _resize_group(images, size, interpolation)
    imgs = list(images)
    if not imgs:
        raise ValueError("resize_uint8: empty list of images")
    for i, im in enumerate(imgs):
        if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"image {i}: expected a uint8 (3, H, W) tensor, got {im.dtype} {tuple(im.shape)}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(imgs):
        groups.setdefault(tuple(im.shape[-2:]), []).append(i)
    out = torch.empty((len(imgs), 3, *size), dtype=torch.uint8, device=imgs[0].device)
    for members in groups.values():
        resized = _resize_group(torch.stack([imgs[i] for i in members]), size, interpolation)
        out[torch.tensor(members, device=out.device)] = resized
    return out


def flip_pad_crop(
    x: torch.Tensor,
    flip: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    pad: int,
    method: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample horizontal flip, zero pad by ``pad`` and crop back to ``(H, W)`` at ``(top, left)``.

    ``top``/``left`` are offsets in the padded image (0..2·pad), as torchvision's ``RandomCrop``
    after ``Pad`` draws them; the flip is applied before padding, as in CLIP-ReID. ``method``:
    ``"loop"`` (slice copies per sample), ``"gather"`` (vectorised) or ``"auto"`` (loop on the
    CPU, gather elsewhere); all give identical results. ``out`` (same shape, any dtype, e.g. a
    float32 buffer) receives the result — the uint8 → float conversion then happens in the copy.
    """
    if method not in ("auto", "loop", "gather"):
        raise ValueError(f"method must be 'auto', 'loop' or 'gather', got {method!r}")
    b, c, h, w = x.shape
    if out is not None and (tuple(out.shape) != tuple(x.shape) or out.device != x.device):
        raise ValueError(f"out must have shape {tuple(x.shape)} on {x.device}, got {tuple(out.shape)} on {out.device}")
    if method == "loop" or (method == "auto" and x.device.type == "cpu"):
        if out is None:
            out = torch.empty_like(x)
        flips, tops, lefts = flip.tolist(), top.tolist(), left.tolist()
        for i in range(b):
            dy, dx = int(tops[i]) - pad, int(lefts[i]) - pad
            y0, y1 = max(0, -dy), min(h, h - dy)
            x0, x1 = max(0, -dx), min(w, w - dx)
            if y0 >= y1 or x0 >= x1:
                out[i].zero_()
                continue
            # zero padding: only the strips the crop exposes
            out[i, :, :y0].zero_()
            out[i, :, y1:].zero_()
            out[i, :, y0:y1, :x0].zero_()
            out[i, :, y0:y1, x1:].zero_()
            if flips[i]:
                # flipped source column for output x is w-1-(x+dx): a reversed slice.
                src = x[i, :, y0 + dy : y1 + dy, w - x1 - dx : w - x0 - dx].flip(-1)
            else:
                src = x[i, :, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
            out[i, :, y0:y1, x0:x1].copy_(src)
        return out
    dev = x.device
    top, left, flip = top.to(dev), left.to(dev), flip.to(dev)
    ys = torch.arange(h, device=dev)[None, :] + (top - pad)[:, None]
    xs = torch.arange(w, device=dev)[None, :] + (left - pad)[:, None]
    xs = torch.where(flip[:, None], w - 1 - xs, xs)
    valid = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
    res = x.gather(2, ys.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w))
    res = res.gather(3, xs.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w))
    res = res.masked_fill_(~valid[:, None], 0)
    if out is None:
        return res
    return out.copy_(res)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` → float32 ``(x / 255 - mean) / std`` (ToTensor + Normalize).

    A float32 input holding 0..255 values is normalised in place.
    """
    y = x if x.dtype == torch.float32 else x.to(torch.float32)
    y.div_(255.0)
    for ch in range(y.shape[1]):
        y[:, ch].sub_(float(mean[ch])).div_(float(std[ch]))
    return y


@dataclass
class AugmentParams:
    """Random parameters for one batch (CPU tensors, one entry per sample)."""

    flip: torch.Tensor  # bool (B,)
    top: torch.Tensor  # long (B,), crop offset in the padded image, 0..2·pad
    left: torch.Tensor  # long (B,)
    erase: torch.Tensor  # bool (B,): erase this sample
    box: torch.Tensor  # long (B, 4): y0, x0, h, w of the erased box (meaningful where erase)
    noise_seed: int  # seeds the erase-noise generator on the batch's device

    def __len__(self) -> int:
        return int(self.flip.numel())


class TrainTransform:
    """CLIP-ReID's stage-2 train augmentation on uint8 batches; see the module docstring.

    ``generator`` (a CPU ``torch.Generator``) drives every random choice; pass ``seed`` instead
    to make one. Call it on a uint8 ``(B, 3, h, w)`` batch or a list of ``(3, h_i, w_i)`` images.
    """

    def __init__(
        self,
        size: Sequence[int] = (256, 128),
        flip_p: float = 0.5,
        pad: int = 10,
        erase_p: float = 0.5,
        mean: Sequence[float] = CLIP_VIT_MEAN,
        std: Sequence[float] = CLIP_VIT_STD,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        self.size = _check_size(size)
        for name, p in (("flip_p", flip_p), ("erase_p", erase_p)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if int(pad) < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
            raise ValueError(f"mean and std need 3 entries with std > 0, got mean={tuple(mean)} std={tuple(std)}")
        if interpolation not in _PIL_MODES:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_MODES)}, got {interpolation!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        self.flip_p, self.pad, self.erase_p = float(flip_p), int(pad), float(erase_p)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        self.generator = generator
        self._noise_gens: dict[torch.device, torch.Generator] = {}

    def sample_params(self, batch_size: int) -> AugmentParams:
        """Draw every random choice for a batch, vectorised, from :attr:`generator`."""
        g, b = self.generator, int(batch_size)
        h, w = self.size
        flip = torch.rand(b, generator=g) < self.flip_p
        top = torch.randint(0, 2 * self.pad + 1, (b,), generator=g)
        left = torch.randint(0, 2 * self.pad + 1, (b,), generator=g)
        coin = torch.rand(b, generator=g, dtype=torch.float64) < self.erase_p
        t = ERASE_ATTEMPTS
        area = (torch.rand(b, t, generator=g, dtype=torch.float64) * (ERASE_MAX_AREA - ERASE_MIN_AREA) + ERASE_MIN_AREA) * (h * w)
        lo, hi = math.log(ERASE_MIN_ASPECT), math.log(1.0 / ERASE_MIN_ASPECT)
        aspect = torch.exp(torch.rand(b, t, generator=g, dtype=torch.float64) * (hi - lo) + lo)
        eh = torch.round(torch.sqrt(area * aspect)).long()
        ew = torch.round(torch.sqrt(area / aspect)).long()
        ok = (eh < h) & (ew < w)
        first = ok.to(torch.int8).argmax(dim=1)
        rows = torch.arange(b)
        bh, bw = eh[rows, first], ew[rows, first]
        u_top = torch.rand(b, generator=g, dtype=torch.float64)
        u_left = torch.rand(b, generator=g, dtype=torch.float64)
        y0 = torch.floor(u_top * (h - bh + 1).clamp(min=1)).long()
        x0 = torch.floor(u_left * (w - bw + 1).clamp(min=1)).long()
        erase = coin & ok.any(dim=1)
        box = torch.stack([y0, x0, bh, bw], dim=1)
        box[~erase] = 0
        noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        return AugmentParams(flip=flip, top=top, left=left, erase=erase, box=box, noise_seed=noise_seed)

    def _noise_generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = self._noise_gens.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            self._noise_gens[device] = gen
        gen.manual_seed(seed)
        return gen

    def apply(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        params: AugmentParams,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Resize, flip, pad-crop, normalise and erase ``images`` with the given parameters.

        ``out``: an optional float32 ``(B, 3, H, W)`` buffer on the batch's device to write into
        and return. Reusing one saves the page faults of a fresh 25 MB allocation per batch on the
        CPU; only reuse it once the previous batch is no longer needed (e.g. after ``backward``).
        """
        x = resize_uint8(images, self.size, self.interpolation)
        b = x.shape[0]
        if len(params) != b:
            raise ValueError(f"params are for {len(params)} samples, batch has {b}")
        if out is None:
            out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        elif out.dtype != torch.float32 or tuple(out.shape) != tuple(x.shape) or out.device != x.device:
            raise ValueError(
                f"out must be float32 {tuple(x.shape)} on {x.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        flip_pad_crop(x, params.flip, params.top, params.left, self.pad, out=out)
        y = normalize(out, self.mean, self.std)
        if bool(params.erase.any()):
            y = self._erase(y, params)
        return y

    def _erase(self, y: torch.Tensor, params: AugmentParams, method: str = "auto") -> torch.Tensor:
        """Fill each erased box with N(0, 1) noise; ``method`` as in :func:`flip_pad_crop`.

        The noise is one flat draw consumed in (sample, channel, row, column) order, so the
        per-sample slice loop (CPU) and the vectorised masked scatter (GPU) write the same values.
        """
        if method not in ("auto", "loop", "gather"):
            raise ValueError(f"method must be 'auto', 'loop' or 'gather', got {method!r}")
        b, c, h, w = y.shape
        dev = y.device
        box = params.box
        count = int((box[:, 2] * box[:, 3] * params.erase.long()).sum()) * c
        if count == 0:
            return y
        noise = torch.randn(count, generator=self._noise_generator(dev, params.noise_seed), device=dev, dtype=y.dtype)
        if method == "loop" or (method == "auto" and dev.type == "cpu"):
            offset = 0
            for i in params.erase.nonzero().flatten().tolist():
                y0, x0, eh, ew = (int(v) for v in box[i].tolist())
                n = c * eh * ew
                y[i, :, y0 : y0 + eh, x0 : x0 + ew] = noise[offset : offset + n].view(c, eh, ew)
                offset += n
            return y
        box_d, erase_d = box.to(dev), params.erase.to(dev)
        rows = torch.arange(h, device=dev)[None, :]
        cols = torch.arange(w, device=dev)[None, :]
        in_rows = (rows >= box_d[:, :1]) & (rows < box_d[:, :1] + box_d[:, 2:3])
        in_cols = (cols >= box_d[:, 1:2]) & (cols < box_d[:, 1:2] + box_d[:, 3:4])
        mask = (in_rows[:, :, None] & in_cols[:, None, :]) & erase_d[:, None, None]
        # masked_scatter fills in (b, c, y, x) order: per sample, each channel's box row by row,
        # i.e. exactly like assigning a contiguous (c, h, w) normal tensor to the box.
        return y.masked_scatter_(mask[:, None].expand(b, c, h, w), noise)

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        return self.apply(images, self.sample_params(n), out=out)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, flip_p={self.flip_p}, pad={self.pad}, erase_p={self.erase_p}, "
            f"mean={self.mean}, std={self.std}, interpolation={self.interpolation!r})"
        )


class TestTransform:
    """Resize + normalise (CLIP-ReID's test transform; torchvision's default bilinear resize)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        size: Sequence[int] = (256, 128),
        mean: Sequence[float] = CLIP_VIT_MEAN,
        std: Sequence[float] = CLIP_VIT_STD,
        interpolation: str = "bilinear",
    ) -> None:
        self.size = _check_size(size)
        if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
            raise ValueError(f"mean and std need 3 entries with std > 0, got mean={tuple(mean)} std={tuple(std)}")
        if interpolation not in _PIL_MODES:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_MODES)}, got {interpolation!r}")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.interpolation = interpolation

    def __call__(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        return normalize(resize_uint8(images, self.size, self.interpolation), self.mean, self.std)

    def __repr__(self) -> str:
        return f"TestTransform(size={self.size}, mean={self.mean}, std={self.std}, interpolation={self.interpolation!r})"
