"""Batched feature extraction from an :class:`~reid_pipeline.data.cache.ImageCache`.

Used for the stage-1 image features (the frozen CLIP's ``encode_image``) and for query/gallery
features (a :class:`~reid_pipeline.model.reid_model.ReIDModel` in eval mode, or its frozen
baseline). Features come back as float32 on the CPU, in the order of ``indices``, unnormalised.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.device import DeviceSpec

__all__ = ["extract_features"]


@torch.no_grad()
def extract_features(
    model_or_fn: nn.Module | Callable[..., torch.Tensor],
    cache: ImageCache,
    indices: Sequence[int] | np.ndarray | torch.Tensor | None,
    transform: Callable[[torch.Tensor | list[torch.Tensor]], torch.Tensor],
    device_spec: DeviceSpec,
    batch_size: int = 128,
    cam_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    parallel=None,
) -> torch.Tensor:
    """Features ``(N, D)`` (float32, CPU) of the images at ``indices`` (all when ``None``).

    ``model_or_fn``: an ``nn.Module`` (moved to the device and run in eval mode; its previous
    train/eval mode is restored afterwards) or a callable such as ``clip_model.encode_image``.
    ``transform`` turns a uint8 batch (or list) on the device into the model input, e.g.
    :class:`~reid_pipeline.data.transforms.TestTransform`. ``cam_ids`` (one per *cache* image,
    0-based) are passed as the second argument when given — needed by a model with SIE.
    Runs under ``torch.no_grad()`` and the device's autocast.

    ``parallel`` (a :class:`~reid_pipeline.training.distributed.Parallel`): each rank extracts a
    contiguous run of whole batches (the very batches one process would run, so the features are
    identical) and every rank gets all features back, in order.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx_all = torch.arange(len(cache)) if indices is None else torch.as_tensor(np.array(indices), dtype=torch.long).reshape(-1)
    if parallel is not None and parallel.world_size > 1:
        n, bs = idx_all.numel(), int(batch_size)
        batches = -(-n // bs)
        spans = [parallel.bounds_of(r, batches) for r in range(parallel.world_size)]
        sizes = tuple(min(n, b1 * bs) - min(n, b0 * bs) for b0, b1 in spans)
        lo_b, hi_b = spans[parallel.rank]
        local = extract_features(model_or_fn, cache, idx_all[lo_b * bs : hi_b * bs], transform, device_spec, bs, cam_ids)
        return parallel.gather_rows(local, sizes)
    cams = None
    if cam_ids is not None:
        cams = torch.as_tensor(np.array(cam_ids), dtype=torch.long).reshape(-1)
        if cams.numel() != len(cache):
            raise ValueError(f"cam_ids has {cams.numel()} entries, expected one per cached image ({len(cache)})")
    device = device_spec.device
    was_training = None
    if isinstance(model_or_fn, nn.Module):
        was_training = model_or_fn.training
        model_or_fn.to(device).eval()
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, idx_all.numel(), int(batch_size)):
            idx = idx_all[start : start + int(batch_size)]
            x = transform(cache.fetch(idx, device))
            with device_spec.autocast():
                if cams is not None:
                    out = model_or_fn(x, cams[idx].to(device))
                else:
                    out = model_or_fn(x)
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != idx.numel():
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"feature extractor returned {shape}, expected ({idx.numel()}, D)")
            chunks.append(out.float().cpu())
    finally:
        if was_training:
            model_or_fn.train()
    if not chunks:
        return torch.zeros(0, 0)
    return torch.cat(chunks)
