"""Per-sample PIL/torchvision reference pipelines with CLIP-ReID's semantics.

Test and benchmark helpers only (the slow baselines the batched transforms of
:mod:`reid_pipeline.data.transforms` are checked and timed against); not part of the library.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from PIL import Image

from reid_pipeline.data.transforms import (
    CLIP_VIT_MEAN,
    CLIP_VIT_STD,
    ERASE_ATTEMPTS,
    ERASE_MAX_AREA,
    ERASE_MIN_AREA,
    ERASE_MIN_ASPECT,
    _check_size,
)

# --------------------------------------------------------------------------------------------
# Per-sample PIL/torchvision reference pipelines (tests and benchmark)


def _tv():
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    return T, TF


class ReferenceTrainTransform:
    """Per-sample PIL → tensor pipeline with CLIP-ReID's train semantics (the slow baseline).

    Randomness comes from Python's ``random`` and torch's global RNG (as in a torchvision
    ``Compose`` inside a ``Dataset``). :meth:`apply_fixed` applies given parameters instead.
    """

    def __init__(
        self,
        size: Sequence[int] = (256, 128),
        flip_p: float = 0.5,
        pad: int = 10,
        erase_p: float = 0.5,
        mean: Sequence[float] = CLIP_VIT_MEAN,
        std: Sequence[float] = CLIP_VIT_STD,
    ) -> None:
        T, _ = _tv()
        self.size = _check_size(size)
        self.pad, self.erase_p = int(pad), float(erase_p)
        self.mean, self.std = tuple(mean), tuple(std)
        self.compose = T.Compose(
            [
                T.Resize(self.size, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=flip_p),
                T.Pad(self.pad),
                T.RandomCrop(self.size),
                T.ToTensor(),
                T.Normalize(mean=self.mean, std=self.std),
            ]
        )

    def _random_erase(self, t: torch.Tensor) -> torch.Tensor:
        """timm ``RandomErasing(mode='pixel', max_count=1)`` on one normalised image."""
        if random.random() > self.erase_p:
            return t
        c, h, w = t.shape
        area = h * w
        lo, hi = math.log(ERASE_MIN_ASPECT), math.log(1.0 / ERASE_MIN_ASPECT)
        for _ in range(ERASE_ATTEMPTS):
            target = random.uniform(ERASE_MIN_AREA, ERASE_MAX_AREA) * area
            aspect = math.exp(random.uniform(lo, hi))
            eh = int(round(math.sqrt(target * aspect)))
            ew = int(round(math.sqrt(target / aspect)))
            if ew < w and eh < h:
                top = random.randint(0, h - eh)
                left = random.randint(0, w - ew)
                t[:, top : top + eh, left : left + ew] = torch.empty((c, eh, ew), dtype=t.dtype).normal_()
                break
        return t

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self._random_erase(self.compose(img))

    def apply_fixed(
        self,
        img: Image.Image,
        flip: bool,
        top: int,
        left: int,
        box: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same pipeline with given flip, crop offsets and (optionally) erase box + noise."""
        T, TF = _tv()
        img = TF.resize(img, list(self.size), interpolation=T.InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        img = TF.pad(img, self.pad)
        img = TF.crop(img, int(top), int(left), self.size[0], self.size[1])
        t = TF.normalize(TF.to_tensor(img), self.mean, self.std)
        if box is not None:
            y0, x0, eh, ew = (int(v) for v in box)
            fill = noise if noise is not None else torch.zeros(3, eh, ew)
            t[:, y0 : y0 + eh, x0 : x0 + ew] = fill.reshape(3, eh, ew)
        return t


class ReferenceTestTransform:
    """Per-sample torchvision ``Resize`` (bilinear) → ``ToTensor`` → ``Normalize``."""

    def __init__(
        self,
        size: Sequence[int] = (256, 128),
        mean: Sequence[float] = CLIP_VIT_MEAN,
        std: Sequence[float] = CLIP_VIT_STD,
        interpolation: str = "bilinear",
    ) -> None:
        T, _ = _tv()
        mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
        self.compose = T.Compose(
            [T.Resize(_check_size(size), interpolation=mode), T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.compose(img)
