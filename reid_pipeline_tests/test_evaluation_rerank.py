"""re_ranking against a dense, step-by-step implementation of the published algorithm."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from reid_pipeline.evaluation import evaluate_rank, re_ranking


def _dense_reference(q, g, k1, k2, lambda_value, v_dtype=np.float64):
    """The published k-reciprocal algorithm with dense N x N arrays and Python loops
    (``v_dtype=np.float16`` is the published storage precision)."""
    feat = torch.cat([torch.as_tensor(q), torch.as_tensor(g)]).float()
    nq, n = len(q), feat.shape[0]
    sq = feat.pow(2).sum(1, keepdim=True).expand(n, n)
    dist = (sq + sq.t()).addmm_(feat, feat.t(), beta=1, alpha=-2).numpy()
    original = np.transpose(dist / np.max(dist, axis=0))
    rank = np.argsort(original, axis=1, kind="stable")
    V = np.zeros((n, n), dtype=v_dtype)
    half = int(np.around(k1 / 2))
    for i in range(n):
        fwd = rank[i, : k1 + 1]
        krec = fwd[np.where(rank[fwd, : k1 + 1] == i)[0]]
        expansion = krec
        for c in krec:
            cf = rank[c, : half + 1]
            crec = cf[np.where(rank[cf, : half + 1] == c)[0]]
            if len(np.intersect1d(crec, krec)) > 2 / 3 * len(crec):
                expansion = np.append(expansion, crec)
        expansion = np.unique(expansion)
        w = np.exp(-original[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)]).astype(v_dtype)
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        tmin = np.minimum(V[i][None, :], V).sum(axis=1)
        jaccard[i] = 1 - tmin / (2 - tmin)
    final = jaccard * (1 - lambda_value) + original[:nq] * lambda_value
    return final[:, nq:]


def _clustered(seed, num_q, num_g, ids, dim=16, noise=0.8, normalise=True):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((ids, dim)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, ids, num_q), rng.integers(0, ids, num_g)
    f = np.concatenate([centers[q_pids], centers[g_pids]])
    f += noise * rng.standard_normal((num_q + num_g, dim)).astype(np.float32)
    if normalise:
        f /= np.linalg.norm(f, axis=1, keepdims=True)
    return f[:num_q], f[num_q:], q_pids, g_pids


@pytest.mark.parametrize(
    "num_q, num_g, k1, k2, lam, query_chunk, block",
    [
        (30, 120, 20, 6, 0.3, None, 2048),   # torchreid's defaults
        (50, 300, 50, 15, 0.3, 7, 37),       # CLIP-ReID's defaults, chunks smaller than Q and k1
        (12, 40, 5, 1, 0.0, 1, 9),           # no query expansion, Jaccard only
        (6, 25, 50, 15, 1.0, None, 2048),    # k1 > N: every neighbour list is the whole set
        (40, 200, 7, 3, 0.5, 16, 64),
    ],
)
def test_matches_dense_reference(num_q, num_g, k1, k2, lam, query_chunk, block):
    qf, gf, _, _ = _clustered(num_q + k1, num_q, num_g, ids=max(3, (num_q + num_g) // 15))
    ref = _dense_reference(qf, gf, k1, k2, lam)
    ours = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam, query_chunk=query_chunk, block_size=block,
                      normalize_features=False)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (num_q, num_g)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)
    _assert_same_ranking(ours, ref)


def _assert_same_ranking(ours, ref, tol=2e-6):
    """Our ranking is the reference's, except among items the reference ranks within ``tol``
    (float32 rounding): walking our order, reference distances never drop by more than ``tol``."""
    order = np.argsort(ours, axis=1, kind="stable")
    ref_along_ours = np.take_along_axis(ref, order, axis=1)
    assert np.all(np.diff(ref_along_ours, axis=1) >= -tol)
    same = (order == np.argsort(ref, axis=1, kind="stable")).mean()
    assert same > 0.999, f"only {same:.4%} of rank positions agree"


def test_same_map_as_published_float16_version():
    qf, gf, qp, gp = _clustered(5, 60, 300, ids=20, noise=1.2)
    rng = np.random.default_rng(5)
    qc, gc = rng.integers(0, 3, 60), rng.integers(0, 3, 300)
    published = evaluate_rank(_dense_reference(qf, gf, 20, 6, 0.3, v_dtype=np.float16), qp, gp, qc, gc)
    ours = evaluate_rank(re_ranking(qf, gf, k1=20, k2=6, normalize_features=False), qp, gp, qc, gc)
    assert abs(ours["mAP"] - published["mAP"]) < 1e-3


def test_torch_numpy_and_thread_counts_give_identical_results():
    qf, gf, _, _ = _clustered(9, 64, 700, ids=40)
    a = re_ranking(qf, gf, k1=20, k2=6, num_threads=1, block_size=128)
    b = re_ranking(torch.from_numpy(qf), torch.from_numpy(gf), k1=20, k2=6, num_threads=2, block_size=128,
                   query_chunk=5)
    c = re_ranking(qf, gf, k1=20, k2=6, num_threads=3, block_size=333)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_tied_distances_follow_index_order():
    # integer-valued features give many exactly equal distances; neighbour lists must follow a
    # stable argsort (ties by index), as the dense reference with kind="stable" does
    rng = np.random.default_rng(4)
    f = rng.integers(0, 3, (130, 3)).astype(np.float32) + 0.5
    ref = _dense_reference(f[:20], f[20:], 10, 4, 0.3)
    ours = re_ranking(f[:20], f[20:], k1=10, k2=4, block_size=16, normalize_features=False)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_features_are_normalised_by_default():
    qf, gf, _, _ = _clustered(3, 20, 80, ids=6, normalise=False)
    scaled = re_ranking(qf * 7.0, gf * 0.5, k1=10, k2=4)  # normalisation removes any scale
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    np.testing.assert_allclose(scaled, _dense_reference(qn, gn, 10, 4, 0.3), atol=2e-6, rtol=0)


def test_timings_are_reported_per_stage():
    qf, gf, _, _ = _clustered(1, 10, 50, ids=5)
    timings: dict[str, float] = {}
    re_ranking(qf, gf, k1=5, k2=3, timings=timings)
    assert set(timings) == {"neighbours", "encoding", "query_expansion", "inverted_index", "jaccard"}
    assert all(t >= 0 for t in timings.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k1": 0}, "k1"),
        ({"k2": 0}, "k2"),
        ({"lambda_value": 1.5}, "lambda"),
        ({"query_chunk": 0}, "query_chunk"),
        ({"block_size": 0}, "block_size"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    qf, gf, _, _ = _clustered(0, 5, 20, ids=3)
    with pytest.raises(ValueError, match=match):
        re_ranking(qf, gf, **kwargs)


def test_bad_features_raise():
    qf, gf, _, _ = _clustered(0, 5, 20, ids=3)
    with pytest.raises(ValueError, match="dimension"):
        re_ranking(qf, gf[:, :8])
    with pytest.raises(ValueError, match="NaN"):
        bad = qf.copy()
        bad[0, 0] = np.nan
        re_ranking(bad, gf)
    with pytest.raises(ValueError, match="queries and gallery"):
        re_ranking(qf[:0], gf)


def test_memory_stays_far_below_dense_n_squared():
    """N = 12000 images: one dense N x N float32 matrix alone would be 576 MB and the published
    algorithm holds several. Run in a fresh process and bound its peak RSS growth."""
    script = textwrap.dedent(
        """
        import json, numpy as np, torch
        from reid_pipeline.evaluation import re_ranking

        def hwm():
            with open("/proc/self/status") as fh:
                return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM")) * 1024

        rng = np.random.default_rng(0)
        f = rng.standard_normal((12000, 8)).astype(np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        re_ranking(f[:4], f[4:8], k1=5, k2=2)  # warm up allocator and thread pool
        before = hwm()
        out = re_ranking(f[:50], f[50:], k1=20, k2=6, query_chunk=16, block_size=512)
        print(json.dumps({"growth": hwm() - before, "shape": list(out.shape)}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["shape"] == [50, 11950]
    # work buffers (blocks, per-worker scratch) and sparse structures, about 140 MB here: less
    # than half of a single N x N float32 matrix (576 MB)
    assert res["growth"] < 0.5 * 12000**2 * 4, f"peak RSS grew by {res['growth'] / 1e6:.0f} MB"
