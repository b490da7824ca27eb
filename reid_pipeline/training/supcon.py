"""CLIP-ReID's supervised contrastive loss between image and text features (stage 1).

``supcon_loss(a, b, a_labels, b_labels)``: logits ``a @ b.T / temperature`` (temperature 1, raw dot
products as CLIP-ReID); per row the row maximum (detached) is subtracted, a log-softmax is taken
over the columns, the log-probabilities are averaged over the row's positives (columns with the
same label), negated, and averaged over the rows. Stage 1 uses both directions:
``supcon_loss(img, txt, y, y) + supcon_loss(txt, img, y, y)`` (:func:`stage1_loss`).
"""

from __future__ import annotations

import torch

__all__ = ["supcon_loss", "stage1_loss", "average_positives"]


def _check(features: torch.Tensor, text_features: torch.Tensor, f_labels: torch.Tensor, t_labels: torch.Tensor) -> None:
    if features.dim() != 2 or text_features.dim() != 2:
        raise ValueError(
            f"features must be 2-D (N, D); got {tuple(features.shape)} and {tuple(text_features.shape)}"
        )
    if features.shape[1] != text_features.shape[1]:
        raise ValueError(f"feature dims differ: {features.shape[1]} vs {text_features.shape[1]}")
    if f_labels.shape != (features.shape[0],) or t_labels.shape != (text_features.shape[0],):
        raise ValueError(
            f"labels must be 1-D with one entry per row: features {features.shape[0]} rows / labels "
            f"{tuple(f_labels.shape)}, other side {text_features.shape[0]} rows / labels {tuple(t_labels.shape)}"
        )
    if features.shape[0] == 0:
        raise ValueError("supcon_loss needs at least one row (got an empty batch)")


def supcon_loss(
    features: torch.Tensor,
    text_features: torch.Tensor,
    f_labels: torch.Tensor,
    t_labels: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Supervised contrastive loss of ``features`` (rows, anchors) against ``text_features`` (columns).

    Every row must have at least one positive (a column with its label); in stage 1 each sample's own
    pair guarantees it. Computed in float32.
    """
    _check(features, text_features, f_labels, t_labels)
    logits = features.float() @ text_features.float().T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = torch.log_softmax(logits, dim=1)
    positives = (f_labels.view(-1, 1) == t_labels.view(1, -1)).to(log_prob.dtype)
    count = positives.sum(dim=1)
    # With the same labels on both sides every row is its own positive; skip the check (a GPU sync).
    if (f_labels is not t_labels or features.shape[0] != text_features.shape[0]) and bool((count == 0).any()):
        raise ValueError(f"{int((count == 0).sum())} row(s) have no positive column (no column with the same label)")
    return -((positives * log_prob).sum(dim=1) / count).mean()


def stage1_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image→text plus text→image :func:`supcon_loss` with the same labels on both sides."""
    return supcon_loss(image_features, text_features, labels, labels) + supcon_loss(
        text_features, image_features, labels, labels
    )


def average_positives(labels: torch.Tensor) -> float:
    """Mean number of positives per sample in a batch: samples with the same label, itself included.

    1.0 means every sample's only positive is its own image–text pair.
    """
    if labels.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}")
    _, counts = torch.unique(labels, return_counts=True)
    return float((counts.double() ** 2).sum() / labels.numel())
