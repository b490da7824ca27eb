"""Query-gallery distances on L2-normalised features, computed in chunks.

CLIP-ReID's test protocol normalises the features, then uses the squared Euclidean distance
``||q||^2 + ||g||^2 - 2 q.g`` (which for unit vectors equals ``2 - 2 cos``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_feature_tensor", "check_chunk_size", "normalize", "pairwise_distance"]


def check_chunk_size(value: Any, name: str = "chunk_size", *, optional: bool = False) -> int | None:
    """``value`` as an int if it is a positive integer (``None`` too when ``optional``), else ``ValueError``."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")
    return int(value)


def as_feature_tensor(x: Any, name: str = "features") -> torch.Tensor:
    """Turn a numpy array or tensor of shape (N, D), D >= 1, of real numbers into a floating tensor
    (no copy when possible). Boolean, complex and object data are refused, as are scalars and
    features of dimension 0."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.complexfloating) or not (
            np.issubdtype(x.dtype, np.number)
        ):
            raise ValueError(f"{name} must hold real numbers, got a numpy array of dtype {x.dtype}")
        if x.ndim == 0:  # np.ascontiguousarray would make it 1-D
            raise ValueError(f"{name} must be 2-D (num_samples, dim), got a 0-d scalar")
    if isinstance(x, torch.Tensor):
        t = x.detach()
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x)) if x.flags.writeable else torch.tensor(x)
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.ndim == 0:
        raise ValueError(f"{name} must be 2-D (num_samples, dim), got a 0-d scalar")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_samples, dim), got shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"{name} have dimension 0 (shape {tuple(t.shape)}); expected at least one feature per sample")
    if not t.is_floating_point():
        t = t.float()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def normalize(x: Any, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise the rows of ``x`` (numpy or torch), returning a float tensor."""
    t = as_feature_tensor(x)
    return torch.nn.functional.normalize(t, p=2.0, dim=1, eps=eps)


def pairwise_distance(
    q: Any,
    g: Any,
    chunk_size: int = 2048,
    normalize_features: bool = True,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Squared Euclidean distances between query and gallery rows, as a (Q, G) float32 CPU tensor.

    With ``normalize_features`` (the default, as CLIP-ReID) both sets are L2-normalised first.
    The matrix is computed ``chunk_size`` query rows at a time on ``device`` (default: the device
    of ``q``), so the only full-size allocation is the float32 output.
    """
    chunk_size = check_chunk_size(chunk_size)
    qt = as_feature_tensor(q, "query features")
    gt = as_feature_tensor(g, "gallery features")
    if qt.shape[1] != gt.shape[1]:
        raise ValueError(
            f"query and gallery features differ in dimension: {qt.shape[1]} vs {gt.shape[1]}"
        )
    dev = torch.device(device) if device is not None else qt.device
    dtype = torch.float64 if qt.dtype == torch.float64 and gt.dtype == torch.float64 else torch.float32
    gt = gt.to(dev, dtype)
    if normalize_features:
        gt = torch.nn.functional.normalize(gt, p=2.0, dim=1)
    g_sq = (gt * gt).sum(dim=1)
    out = torch.empty((qt.shape[0], gt.shape[0]), dtype=torch.float32)
    for start in range(0, qt.shape[0], chunk_size):
        qc = qt[start : start + chunk_size].to(dev, dtype)
        if normalize_features:
            qc = torch.nn.functional.normalize(qc, p=2.0, dim=1)
        q_sq = (qc * qc).sum(dim=1, keepdim=True)
        d = torch.addmm(q_sq + g_sq.unsqueeze(0), qc, gt.t(), beta=1.0, alpha=-2.0)
        out[start : start + qc.shape[0]] = d.to("cpu", torch.float32)
    return out
