"""evaluate_rank, pairwise_distance and ReIDEvaluator against slow, obviously-correct references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_pipeline.evaluation import (
    NoValidQueryError,
    ReIDEvaluator,
    evaluate_rank,
    pairwise_distance,
    re_ranking,
)


def _reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Per-query loop over a stable argsort: the Market-1501 protocol written plainly."""
    distmat = np.asarray(distmat)
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    aps, inps, firsts = [], [], []
    per_query_ap = np.full(num_q, np.nan)
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        hits = (g_pids[order][keep] == q_pids[i]).astype(np.float64)
        if hits.sum() == 0:
            continue
        ranks = np.flatnonzero(hits)  # 0-based ranks of the true matches among kept items
        precision = np.arange(1, len(ranks) + 1) / (ranks + 1.0)
        aps.append(precision.mean())
        per_query_ap[i] = aps[-1]
        inps.append(len(ranks) / (ranks[-1] + 1.0))
        firsts.append(ranks[0])
    if not aps:
        return None
    firsts = np.asarray(firsts)
    cmc = np.array([(firsts <= r).mean() for r in range(max_rank)])
    return {"mAP": np.mean(aps), "mINP": np.mean(inps), "cmc": cmc, "n": len(aps), "AP": per_query_ap}


def _random_case(rng, num_q, num_g, num_ids, num_cams, kind):
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids + 2, num_g)  # some gallery-only identities (distractors)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    if kind == "ties":  # integer-valued distances: many exact ties
        dist = rng.integers(0, 4, (num_q, num_g)).astype(np.float32)
    elif kind == "float64":
        dist = rng.random((num_q, num_g))
    elif kind == "int":
        dist = rng.integers(-3, 3, (num_q, num_g)).astype(np.int64)
    elif kind == "signed_zero":
        dist = rng.choice(np.array([-0.0, 0.0, 1.0], dtype=np.float32), (num_q, num_g))
    else:
        dist = rng.random((num_q, num_g), dtype=np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


def _assert_matches(ours, ref):
    assert ours["num_valid_queries"] == ref["n"]
    assert ours["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert ours["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)
    np.testing.assert_allclose(ours["cmc"], ref["cmc"], atol=1e-12)


@pytest.mark.parametrize("kind", ["float", "ties", "float64", "int", "signed_zero"])
@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_reference(kind, seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(5, 40)), int(rng.integers(5, 80))
    case = _random_case(rng, num_q, num_g, num_ids=int(rng.integers(2, 8)), num_cams=3, kind=kind)
    max_rank = int(rng.integers(1, 100))
    ref = _reference(*case, max_rank=max_rank)
    if ref is None:
        with pytest.raises(NoValidQueryError):
            evaluate_rank(*case, max_rank=max_rank)
        return
    ours = evaluate_rank(*case, max_rank=max_rank, chunk_size=int(rng.integers(1, 9)), return_per_query=True)
    _assert_matches(ours, ref)
    np.testing.assert_allclose(ours["AP"], ref["AP"], atol=1e-12)  # NaN where skipped
    assert len(ours["cmc"]) == min(max_rank, num_g)


def test_torch_input_equals_numpy_input():
    rng = np.random.default_rng(7)
    dist, qp, gp, qc, gc = _random_case(rng, 30, 70, 5, 3, "ties")
    a = evaluate_rank(dist, qp, gp, qc, gc)
    b = evaluate_rank(torch.from_numpy(dist), torch.from_numpy(qp), torch.from_numpy(gp),
                      torch.from_numpy(qc), torch.from_numpy(gc))
    assert a["mAP"] == b["mAP"] and a["mINP"] == b["mINP"]
    np.testing.assert_array_equal(a["cmc"], b["cmc"])


def test_float16_input_and_string_labels():
    rng = np.random.default_rng(3)
    dist, qp, gp, qc, gc = _random_case(rng, 20, 50, 4, 3, "ties")
    ref = _reference(dist, qp, gp, qc, gc)
    ours = evaluate_rank(torch.from_numpy(dist).half(), qp.astype(str), gp.astype(str),
                         np.char.add("cam", qc.astype(str)), np.char.add("cam", gc.astype(str)))
    _assert_matches(ours, ref)


def test_queries_without_true_matches_are_skipped():
    dist = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1], [0.5, 0.4, 0.6]], dtype=np.float32)
    q_pids, g_pids = np.array([1, 2, 9]), np.array([1, 2, 2])
    q_cams, g_cams = np.array([0, 0, 0]), np.array([1, 1, 0])
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    assert res["num_valid_queries"] == 2  # pid 9 is not in the gallery
    # query 0: match at rank 1; query 1: its nearest item (gallery 2) shares pid and camera and
    # is discarded, so gallery 1 is a match at rank 1
    assert res["mAP"] == pytest.approx(1.0)
    assert res["cmc"][0] == pytest.approx(1.0)


def test_same_camera_matches_are_discarded():
    dist = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    res = evaluate_rank(dist, [5], [5, 7, 5], [0], [0, 1, 1])
    # the nearest item (same pid, same camera) is removed; the true match is then at rank 2
    assert res["cmc"].tolist() == [0.0, 1.0, 1.0]  # length min(max_rank, G)
    assert res["mAP"] == pytest.approx(0.5)
    assert res["mINP"] == pytest.approx(0.5)


def test_max_rank_larger_than_gallery_is_clamped():
    rng = np.random.default_rng(11)
    case = _random_case(rng, 10, 6, 3, 3, "float")
    res = evaluate_rank(*case, max_rank=50)
    assert len(res["cmc"]) == 6
    _assert_matches(res, _reference(*case, max_rank=50))


def test_one_camera_data_gives_a_clear_error():
    rng = np.random.default_rng(0)
    dist = rng.random((8, 20), dtype=np.float32)
    pids = rng.integers(0, 3, 20)
    with pytest.raises(NoValidQueryError, match="camera") as info:
        evaluate_rank(dist, pids[:8], pids, np.zeros(8), np.zeros(20))
    assert isinstance(info.value, ValueError)


def test_disjoint_identities_give_a_clear_error():
    with pytest.raises(NoValidQueryError, match="pid"):
        evaluate_rank(np.ones((2, 3)), [1, 2], [3, 4, 5], [0, 0], [1, 1, 1])


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.ones((2, 3)), [1, 2, 3], [1, 2, 3], [0, 0], [1, 1, 1]), "q_pids"),
        ((np.ones((2, 3)), [1, 2], [1, 2], [0, 0], [1, 1, 1]), "g_pids"),
        ((np.ones(3), [1], [1, 2, 3], [0], [1, 1, 1]), "2-D"),
        ((np.ones((0, 3)), [], [1, 2, 3], [], [1, 1, 1]), "empty"),
    ],
)
def test_bad_inputs_raise_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        evaluate_rank(*args)


def test_bad_max_rank_and_nan():
    dist = np.array([[0.1, np.nan]], dtype=np.float32)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(dist, [1], [1, 2], [0], [1, 1], max_rank=0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.array([[np.nan, 0.1]], dtype=np.float32), [1], [1, 2], [0], [1, 1])
    # NaN at a non-matching item ranks last, as in numpy's sort
    res = evaluate_rank(dist, [1], [1, 2], [0], [1, 1])
    assert res["mAP"] == 1.0


def test_pairwise_distance_matches_formula_and_chunks():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(37, 16, generator=g) * 3, torch.randn(53, 16, generator=g)
    qn, gn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(gal, dim=1)
    expected = ((qn[:, None, :] - gn[None, :, :]) ** 2).sum(-1)
    for chunk in (1, 5, 100):
        d = pairwise_distance(q, gal.numpy(), chunk_size=chunk)
        assert d.dtype == torch.float32 and d.shape == (37, 53)
        torch.testing.assert_close(d, expected, atol=1e-5, rtol=0)
    raw = pairwise_distance(q, gal, normalize_features=False)
    torch.testing.assert_close(raw, torch.cdist(q, gal) ** 2, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="dimension"):
        pairwise_distance(q, torch.randn(4, 8))
    with pytest.raises(ValueError, match="chunk_size"):
        pairwise_distance(q, gal, chunk_size=0)


def _clustered(seed, num_q=40, num_g=160, ids=12, dim=24):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, ids, num_q), rng.integers(0, ids, num_g)
    q_cams, g_cams = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    qf = centers[q_pids] + 0.9 * rng.standard_normal((num_q, dim)).astype(np.float32)
    gf = centers[g_pids] + 0.9 * rng.standard_normal((num_g, dim)).astype(np.float32)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def test_evaluator_streams_batches_like_one_call():
    qf, gf, qp, gp, qc, gc = _clustered(1)
    ev = ReIDEvaluator(max_rank=20)
    feats = np.concatenate([qf, gf])
    pids, cams = np.concatenate([qp, gp]), np.concatenate([qc, gc])
    splits = ["query"] * len(qf) + ["gallery"] * len(gf)
    for s in range(0, len(feats), 33):  # batches mixing both splits
        ev.process(torch.from_numpy(feats[s : s + 33]), pids[s : s + 33], cams[s : s + 33], splits[s : s + 33])
    res = ev.evaluate()
    direct = evaluate_rank(pairwise_distance(qf, gf), qp, gp, qc, gc, max_rank=20)
    assert res["mAP"] == direct["mAP"] and res["mINP"] == direct["mINP"]
    assert res["rank-1"] == direct["cmc"][0] and res["rank-10"] == direct["cmc"][9]
    ev.reset()
    with pytest.raises(ValueError, match="query"):
        ev.evaluate()


def test_evaluator_with_reranking_and_split_errors():
    qf, gf, qp, gp, qc, gc = _clustered(2)
    ev = ReIDEvaluator(rerank=True, k1=10, k2=4)
    ev.process(qf, qp, qc, "query")
    ev.process(gf, gp, gc, "gallery")
    res = ev.evaluate()
    direct = evaluate_rank(re_ranking(qf, gf, k1=10, k2=4), qp, gp, qc, gc)  # normalises by default
    assert res["mAP"] == direct["mAP"] and res["mINP"] == direct["mINP"]
    with pytest.raises(ValueError, match="split"):
        ev.process(qf[:2], qp[:2], qc[:2], "train")
    with pytest.raises(ValueError, match="batch sizes"):
        ev.process(qf[:2], qp[:3], qc[:2], "query")
