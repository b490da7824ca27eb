"""The small CLIP of the embedded default and the tests: ``clip.model.CLIP`` in OpenAI's architecture.

:func:`build_tiny_clip` makes a seeded, randomly initialised model (fast tests of the loading and
training code); :func:`ensure_tiny_clip` saves one as a TorchScript archive in OpenAI's format, which
``clip.load(path)`` reads back. The demo's pre-trained small CLIP is built by
:mod:`reid_pipeline.embedded.build` with :mod:`reid_pipeline.training.clip_pretrain`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reid_pipeline.model.clip_loader import import_clip, save_clip_archive

__all__ = ["TINY_CONFIGS", "build_tiny_clip", "ensure_tiny_clip"]

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    # heads are derived by clip.model.build_model as width // 64, so widths are multiples of 64.
    "vit": {"embed_dim": 128, "image_resolution": 224, "vision_layers": 2, "vision_width": 256, "vision_patch_size": 16,
                "context_length": 77, "vocab_size": 49408, "transformer_width": 128, "transformer_heads": 2,
                "transformer_layers": 2},
    "resnet": {"embed_dim": 128, "image_resolution": 224, "vision_layers": (1, 1, 1, 1), "vision_width": 16,
                   "vision_patch_size": None, "context_length": 77, "vocab_size": 49408, "transformer_width": 128,
                   "transformer_heads": 2, "transformer_layers": 2},
}


def build_tiny_clip(arch: str = "vit", seed: int = 0) -> nn.Module:
    """A small randomly initialised (seeded) ``clip.model.CLIP`` in OpenAI's architecture."""
    if arch not in TINY_CONFIGS:
        raise ValueError(f"arch must be one of {sorted(TINY_CONFIGS)}, got {arch!r}")
    clip = import_clip()
    cpu_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = clip.model.CLIP(**TINY_CONFIGS[arch])
    finally:
        torch.set_rng_state(cpu_state)
    return model.float().eval()


def ensure_tiny_clip(path: str | os.PathLike, arch: str = "vit", seed: int = 0) -> Path:
    """Build and save a randomly initialised small CLIP at ``path`` unless it is already there."""
    path = Path(path)
    if not path.is_file():
        save_clip_archive(build_tiny_clip(arch, seed), path)
    return path
