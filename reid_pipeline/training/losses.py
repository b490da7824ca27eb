"""Stage-2 losses of CLIP-ReID (``loss/softmax_loss.py``, ``loss/triplet_loss.py``, ``loss/make_loss.py``).

* :class:`CrossEntropyLabelSmooth` — targets ``(1-ε)·onehot + ε/C``, loss = mean over the batch of
  ``-Σ_c target_c · log softmax_c``.
* :class:`TripletLoss` — Euclidean distances ``sqrt(clamp(|a|²+|b|²-2a·b, 1e-12))``, for every
  anchor the hardest positive (largest distance, the anchor itself included, as in CLIP-ReID) and the
  hardest negative (smallest distance), ``mean(relu(d_ap - d_an + margin))``.
* :func:`i2t_logits` — ``image_proj @ text_features.T``: raw dot products, no normalisation and no
  logit scale (CLIP-ReID stage 2).
* :class:`Stage2Loss` — ``W_id·(CE_ls(cls) + CE_ls(cls_proj)) + W_tri·Σ_f triplet(f) +
  W_i2t·CE_ls(i2t logits)``; returns the total and each (unweighted) term.

Losses are computed in float32 even under autocast (inputs are cast up): distances and
log-softmax in bf16 lose too much precision for the hard-example mining to be meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CrossEntropyLabelSmooth",
    "TripletLoss",
    "euclidean_dist",
    "hard_example_mining",
    "i2t_logits",
    "Stage2Loss",
    "Stage2LossOutput",
    "LOSS_WEIGHTS",
]

# (id, triplet, i2t) weights of CLIP-ReID's person configs.
LOSS_WEIGHTS = {"vit": (0.25, 1.0, 1.0), "resnet": (1.0, 1.0, 1.0)}


def _check_labels(logits_or_feats: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != logits_or_feats.shape[0]:
        raise ValueError(
            f"{what}: labels must be 1-D with one entry per row ({logits_or_feats.shape[0]}), got shape {tuple(labels.shape)}"
        )


class CrossEntropyLabelSmooth(nn.Module):
    """Cross entropy with label smoothing ε (Szegedy et al.), CLIP-ReID's ``CrossEntropyLabelSmooth``."""

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= float(epsilon) < 1.0:
            raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
        self.num_classes, self.epsilon = int(num_classes), float(epsilon)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must be (B, {self.num_classes}), got {tuple(logits.shape)}")
        _check_labels(logits, labels, "CrossEntropyLabelSmooth")
        log_probs = F.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, labels.long()[:, None]).squeeze(1)
        uniform = -log_probs.sum(dim=1) / self.num_classes
        return ((1.0 - self.epsilon) * nll + self.epsilon * uniform).mean()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``(m, n)``, clamped at 1e-12 before the square root."""
    xx = x.pow(2).sum(dim=1, keepdim=True)
    yy = y.pow(2).sum(dim=1, keepdim=True).t()
    dist = xx + yy - 2.0 * (x @ y.t())
    return dist.clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hardest positive (max distance, same label) and hardest negative (min distance) per anchor.

    Unlike CLIP-ReID's reshape trick this does not need equal counts per identity.
    """
    same = labels[:, None].eq(labels[None, :])
    if bool(same.all()):
        raise ValueError("triplet loss needs at least two identities in the batch (no negatives found)")
    neg_inf = torch.finfo(dist.dtype).min
    pos_inf = torch.finfo(dist.dtype).max
    dist_ap = dist.masked_fill(~same, neg_inf).max(dim=1).values
    dist_an = dist.masked_fill(same, pos_inf).min(dim=1).values
    return dist_ap, dist_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss with margin (CLIP-ReID's ``TripletLoss(margin)``)."""

    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        if float(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = float(margin)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_labels(feats, labels, "TripletLoss")
        f = feats.float()
        dist_ap, dist_an = hard_example_mining(euclidean_dist(f, f), labels)
        # MarginRankingLoss(dist_an, dist_ap, y=1) = mean(max(0, -(an - ap) + margin))
        return F.relu(dist_ap - dist_an + self.margin).mean()


def i2t_logits(image_proj: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``image_proj @ text_features.T`` in float32: raw dot products, no logit scale."""
    if image_proj.shape[-1] != text_features.shape[-1]:
        raise ValueError(
            f"image features are {image_proj.shape[-1]}-d but text features are {text_features.shape[-1]}-d"
        )
    return image_proj.float() @ text_features.float().t()


@dataclass
class Stage2LossOutput:
    """Total loss (for backward) and the unweighted terms (for logging)."""

    total: torch.Tensor
    id: torch.Tensor  # CE_ls(cls) + CE_ls(cls_proj)
    triplet: torch.Tensor  # Σ over the three features
    i2t: torch.Tensor
    i2t_logits: torch.Tensor

    def terms(self) -> dict[str, torch.Tensor]:
        return {"loss": self.total, "id": self.id, "triplet": self.triplet, "i2t": self.i2t}


class Stage2Loss(nn.Module):
    """CLIP-ReID's stage-2 objective; weights default to the ViT preset (0.25 / 1 / 1)."""

    def __init__(
        self,
        num_classes: int,
        *,
        id_weight: float = 0.25,
        triplet_weight: float = 1.0,
        i2t_weight: float = 1.0,
        epsilon: float = 0.1,
        margin: float = 0.3,
    ) -> None:
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(num_classes, epsilon)
        self.triplet = TripletLoss(margin)
        self.id_weight, self.triplet_weight, self.i2t_weight = float(id_weight), float(triplet_weight), float(i2t_weight)

    def forward(
        self,
        logits: Sequence[torch.Tensor],
        feats: Sequence[torch.Tensor],
        image_proj: torch.Tensor,
        text_features: torch.Tensor,
        labels: torch.Tensor,
        *,
        triplet_feats: Sequence[torch.Tensor] | None = None,
        triplet_labels: torch.Tensor | None = None,
    ) -> Stage2LossOutput:
        """``triplet_feats``/``triplet_labels``: the global batch under ``torch.distributed`` (the
        batch-hard triplet mines over all ranks' rows); default: ``feats``/``labels``."""
        id_loss = sum(self.xent(s, labels) for s in logits)
        tri_labels = labels if triplet_labels is None else triplet_labels
        tri_loss = sum(self.triplet(f, tri_labels) for f in (feats if triplet_feats is None else triplet_feats))
        scores = i2t_logits(image_proj, text_features)
        i2t_loss = self.xent(scores, labels)
        total = self.id_weight * id_loss + self.triplet_weight * tri_loss + self.i2t_weight * i2t_loss
        return Stage2LossOutput(total=total, id=id_loss, triplet=tri_loss, i2t=i2t_loss, i2t_logits=scores)
