"""Benchmark: k-reciprocal re-ranking, ours vs a straightforward dense implementation.

The dense reference follows the published algorithm step by step (Zhong et al., CVPR 2017, as
shipped by CLIP-ReID and torchreid): full N x N distances, full argsort, dense float16 V,
query expansion, inverted index and a per-query Jaccard loop (N = queries + gallery).
Each side runs in its own subprocess on the same seeded synthetic features (L2-normalised, 1280-d,
clustered per identity), so time and peak RSS (VmHWM) are measured separately; the mAP of the
re-ranked distances must agree within 1e-3.

    .venv/bin/python benchmarks/reranking.py                  # Market-1501 scale, both sides
    .venv/bin/python benchmarks/reranking.py --scale small    # quick check
    .venv/bin/python benchmarks/reranking.py --scale msmt17   # ours only: must stay < 8 GB

The last line is ``reranking speedup: <ratio>x, memory ratio: <ratio>x`` (dense / ours), or for
``--scale msmt17`` a line with our time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reid_pipeline.evaluation import evaluate_rank, re_ranking  # noqa: E402

SCALES = {
    # name: (num_query, num_gallery, num_ids, num_cams)
    "small": (600, 3000, 150, 6),
    "market": (3368, 15913, 751, 6),
    "msmt17": (11659, 82161, 3060, 15),
}
MEMORY_LIMIT_GB = 8.0


def synthetic_features(scale: str, seed: int = 0, dim: int = 1280, noise: float = 2.2,
                       cam_shift: float = 0.7) -> tuple[np.ndarray, ...]:
    """Seeded L2-normalised features clustered per identity (same recipe as
    benchmarks/evaluation.py), generated in place to keep the footprint at one copy."""
    num_q, num_g, num_ids, num_cams = SCALES[scale]
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_ids, dim), dtype=np.float32)
    cam_bias = rng.standard_normal((num_cams, dim), dtype=np.float32)
    q_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_q - num_ids)])
    g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, num_g - num_ids)])
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)

    # one (Q + G, D) buffer: the query and gallery arrays are views of it, so re_ranking can use
    # it without concatenating (a copy of 0.5 GB at MSMT17 scale)
    pids, cams = np.concatenate([q_pids, g_pids]), np.concatenate([q_cams, g_cams])
    buf = np.empty((len(pids), dim), dtype=np.float32)
    for s in range(0, len(pids), 8192):  # chunked to avoid large temporaries
        p, c = pids[s : s + 8192], cams[s : s + 8192]
        blk = rng.standard_normal((len(p), dim), dtype=np.float32)
        blk *= noise
        blk += centers[p]
        blk += cam_shift * cam_bias[c]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        buf[s : s + len(p)] = blk
    return buf[:num_q], buf[num_q:], q_pids, g_pids, q_cams, g_cams


def dense_reference(q: np.ndarray, g: np.ndarray, k1: int = 50, k2: int = 15,
                    lambda_value: float = 0.3) -> np.ndarray:
    """The published dense algorithm, written plainly (N x N arrays, Python loops)."""
    query_num = q.shape[0]
    feat = torch.cat([torch.from_numpy(q), torch.from_numpy(g)])
    all_num = feat.shape[0]
    sq = feat.pow(2).sum(dim=1, keepdim=True).expand(all_num, all_num)
    distmat = (sq + sq.t()).addmm_(feat, feat.t(), beta=1, alpha=-2)
    original_dist = distmat.numpy()
    del feat, sq, distmat
    original_dist = np.transpose(original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float16)
    initial_rank = np.argsort(original_dist).astype(np.int32)
    half = int(np.around(k1 / 2))
    for i in range(all_num):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        k_reciprocal = forward[np.where(backward == i)[0]]
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            c_forward = initial_rank[candidate, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_reciprocal = c_forward[np.where(c_backward == candidate)[0]]
            if len(np.intersect1d(c_reciprocal, k_reciprocal)) > 2 / 3 * len(c_reciprocal):
                expansion = np.append(expansion, c_reciprocal)
        expansion = np.unique(expansion)
        weight = np.exp(-original_dist[i, expansion])
        V[i, expansion] = weight / np.sum(weight)
    original_dist = original_dist[:query_num]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float16)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    del initial_rank
    inv_index = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float16)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float16)
        nonzero = np.where(V[i, :] != 0)[0]
        for j in nonzero:
            rows = inv_index[j]
            temp_min[0, rows] = temp_min[0, rows] + np.minimum(V[i, j], V[rows, j])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM), in GB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("VmHWM not found in /proc/self/status")


def child(side: str, scale: str, device: str | None, noise: float) -> None:
    """Run one side once and print a JSON line with its time, peak RSS and metrics."""
    qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic_features(scale, noise=noise)
    base_rss = peak_rss_gb()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    if side == "dense":
        dist = dense_reference(qf, gf)
    else:
        both = torch.from_numpy(qf.base)  # views of one buffer: no concatenation copy
        # features are L2-normalised already; the dense reference uses them as given too
        dist = re_ranking(both[: len(qf)], both[len(qf) :], device=device, timings=stages,
                          normalize_features=False)
    elapsed = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    eval_time = time.perf_counter() - t1
    print(json.dumps({
        "side": side, "time": elapsed, "eval_time": eval_time, "peak_rss_gb": peak_rss_gb(),
        "input_rss_gb": base_rss, "mAP": res["mAP"], "rank1": float(res["cmc"][0]),
        "mINP": res["mINP"], "stages": stages, "threads": torch.get_num_threads(),
    }))


def run_child(side: str, scale: str, device: str | None, noise: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--scale", scale,
           "--noise", str(noise)]
    if device:
        cmd += ["--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{side} run failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="market")
    parser.add_argument("--repeats", type=int, default=2, help="runs of ours (best time is kept)")
    parser.add_argument("--device", default=None, help="device for ours, e.g. cuda")
    parser.add_argument("--noise", type=float, default=2.8,
                        help="per-dimension feature noise before normalisation (difficulty)")
    parser.add_argument("--child", choices=["ours", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.scale, args.device, args.noise)
        return

    num_q, num_g, num_ids, num_cams = SCALES[args.scale]
    print(f"scale={args.scale}: {num_q} queries x {num_g} gallery (N={num_q + num_g}), {num_ids} ids, "
          f"{num_cams} cameras, dim 1280, noise {args.noise}, k1=50 k2=15 lambda=0.3, "
          f"torch threads {torch.get_num_threads()}")
    ours_runs = [run_child("ours", args.scale, args.device, args.noise) for _ in range(max(1, args.repeats))]
    ours = min(ours_runs, key=lambda r: r["time"])
    ours_peak = max(r["peak_rss_gb"] for r in ours_runs)
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in ours["stages"].items())
    if args.scale == "msmt17":
        print(f"ours: re-ranking {ours['time']:.1f} s ({stages}); evaluation {ours['eval_time']:.1f} s; "
              f"peak RSS {ours_peak:.2f} GB (features alone {ours['input_rss_gb']:.2f} GB); "
              f"mAP {ours['mAP']:.4f}, rank-1 {ours['rank1']:.4f}")
        ok = ours_peak < MEMORY_LIMIT_GB
        print(f"msmt17 re-ranking + evaluation: {ours['time'] + ours['eval_time']:.1f} s, "
              f"peak RSS {ours_peak:.2f} GB ({'under' if ok else 'OVER'} {MEMORY_LIMIT_GB:.0f} GB)")
        if not ok:
            raise SystemExit(1)
        return

    dense = run_child("dense", args.scale, None, args.noise)
    print(f"{'implementation':<34} {'time (s)':>9} {'peak RSS (GB)':>14} {'mAP':>9} {'rank-1':>9} {'mINP':>9}")
    for name, r, peak in (("dense published algorithm", dense, dense["peak_rss_gb"]),
                          ("ours: re_ranking (sparse)", ours, ours_peak)):
        print(f"{name:<34} {r['time']:>9.2f} {peak:>14.2f} {r['mAP']:>9.5f} {r['rank1']:>9.5f} {r['mINP']:>9.5f}")
    print(f"ours by stage: {stages}; features alone take {ours['input_rss_gb']:.2f} GB RSS; "
          f"ours best of {len(ours_runs)} runs, dense 1 run")
    d_map = abs(ours["mAP"] - dense["mAP"])
    print(f"|mAP difference| = {d_map:.2e} (the published version stores V and Jaccard in float16)")
    if d_map > 1e-3:
        print("MISMATCH: mAP differs by more than 1e-3", file=sys.stderr)
        raise SystemExit(1)
    speedup, memory = dense["time"] / ours["time"], dense["peak_rss_gb"] / ours_peak
    print(f"reranking speedup: {speedup:.2f}x, memory ratio: {memory:.2f}x")


if __name__ == "__main__":
    main()
