"""Stage-2 loss terms against direct, slow formulas."""

from __future__ import annotations

import math

import pytest
import torch

from reid_pipeline.training.losses import (
    LOSS_WEIGHTS,
    CrossEntropyLabelSmooth,
    Stage2Loss,
    TripletLoss,
    euclidean_dist,
    i2t_logits,
)


def slow_ce_ls(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> float:
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        row = [float(v) for v in logits[i]]
        m = max(row)
        log_z = m + math.log(sum(math.exp(v - m) for v in row))
        for j in range(c):
            target = (1 - eps) * (1.0 if j == int(labels[i]) else 0.0) + eps / c
            total += -target * (row[j] - log_z)
    return total / b


def slow_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    n = feats.shape[0]

    def d(i: int, j: int) -> float:
        sq = sum((float(feats[i, k]) - float(feats[j, k])) ** 2 for k in range(feats.shape[1]))
        return math.sqrt(max(sq, 1e-12))

    losses = []
    for a in range(n):
        pos = [d(a, j) for j in range(n) if int(labels[j]) == int(labels[a])]  # includes the anchor itself
        neg = [d(a, j) for j in range(n) if int(labels[j]) != int(labels[a])]
        losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / n


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2, 5, 5, 5, 5])
    return g, labels


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_label_smooth_matches_slow_formula(batch, eps):
    g, labels = batch
    logits = torch.randn(12, 7, generator=g, dtype=torch.float64) * 3
    got = CrossEntropyLabelSmooth(7, eps)(logits, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(slow_ce_ls(logits, labels, eps), rel=1e-5)
    if eps == 0.0:
        assert got.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)


def test_cross_entropy_label_smooth_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        CrossEntropyLabelSmooth(5)(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        CrossEntropyLabelSmooth(4)(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


def test_euclidean_dist_matches_direct_and_clamps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 9, generator=g)
    y = torch.randn(4, 9, generator=g)
    direct = torch.cdist(x.double(), y.double())
    assert torch.allclose(euclidean_dist(x, y).double(), direct, atol=1e-5)
    # self-distance: clamp(0, 1e-12).sqrt() = 1e-6 (never 0 — gradients stay finite)
    self_d = euclidean_dist(x, x).diagonal()
    assert torch.all(self_d <= 1e-2) and torch.all(self_d > 0)


@pytest.mark.parametrize("margin", [0.3, 5.0])
def test_triplet_matches_slow_formula(batch, margin):
    g, labels = batch
    feats = torch.randn(12, 6, generator=g)
    got = TripletLoss(margin)(feats, labels)
    assert got.item() == pytest.approx(slow_triplet(feats, labels, margin), rel=1e-4, abs=1e-5)


def test_triplet_handles_unequal_counts_and_needs_two_ids():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([1, 1, 1, 4, 7, 7])
    feats = torch.randn(6, 5, generator=g)
    assert TripletLoss(0.3)(feats, labels).item() == pytest.approx(slow_triplet(feats, labels, 0.3), rel=1e-4, abs=1e-5)
    with pytest.raises(ValueError, match="two identities"):
        TripletLoss(0.3)(feats, torch.zeros(6, dtype=torch.long))


def test_triplet_gradient_is_finite_with_duplicate_samples():
    # K images drawn with replacement give identical rows: the clamp keeps sqrt's gradient finite.
    feats = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.5, 0.5]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    TripletLoss(0.3)(feats, labels).backward()
    assert torch.isfinite(feats.grad).all()


def test_i2t_logits_are_raw_dot_products():
    g = torch.Generator().manual_seed(2)
    img = torch.randn(4, 8, generator=g)
    txt = torch.randn(3, 8, generator=g) * 5
    got = i2t_logits(img, txt)
    for i in range(4):
        for c in range(3):
            assert got[i, c].item() == pytest.approx(float(sum(img[i, k] * txt[c, k] for k in range(8))), rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="8-d but text features are 7-d"):
        i2t_logits(img, torch.zeros(3, 7))


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_stage2_loss_combines_terms_with_paper_weights(batch, arch):
    g, labels = batch
    num_classes = 6
    w_id, w_tri, w_i2t = LOSS_WEIGHTS[arch]
    logits = [torch.randn(12, num_classes, generator=g) for _ in range(2)]
    feats = [torch.randn(12, d, generator=g) for d in (16, 16, 8)]
    proj = feats[2]
    text = torch.randn(num_classes, 8, generator=g)
    out = Stage2Loss(num_classes, id_weight=w_id, triplet_weight=w_tri, i2t_weight=w_i2t)(logits, feats, proj, text, labels)

    id_slow = sum(slow_ce_ls(s, labels, 0.1) for s in logits)
    tri_slow = sum(slow_triplet(f, labels, 0.3) for f in feats)
    i2t_slow = slow_ce_ls(proj @ text.t(), labels, 0.1)
    assert out.id.item() == pytest.approx(id_slow, rel=1e-5)
    assert out.triplet.item() == pytest.approx(tri_slow, rel=1e-4)
    assert out.i2t.item() == pytest.approx(i2t_slow, rel=1e-5)
    assert out.total.item() == pytest.approx(w_id * id_slow + w_tri * tri_slow + w_i2t * i2t_slow, rel=1e-4)
    assert set(out.terms()) == {"loss", "id", "triplet", "i2t"}
    assert LOSS_WEIGHTS["vit"] == (0.25, 1.0, 1.0) and LOSS_WEIGHTS["resnet"] == (1.0, 1.0, 1.0)


def test_stage2_loss_is_float32_under_bf16_inputs(batch):
    g, labels = batch
    logits = [torch.randn(12, 6, generator=g).bfloat16() for _ in range(2)]
    feats = [torch.randn(12, 8, generator=g).bfloat16() for _ in range(3)]
    out = Stage2Loss(6)(logits, feats, feats[2], torch.randn(6, 8, generator=g), labels)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
