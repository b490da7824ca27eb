"""Market-1501 evaluation protocol (CMC, mAP, mINP) without sorting every row.

Protocol (as torchreid, fast-reid and CLIP-ReID): for each query, gallery items with the same pid
**and** the same camera are discarded; queries left without a true match are skipped; the gallery
is ranked by ascending distance with ties ordered by gallery index (a stable argsort); CMC is the
clipped cumulative match curve averaged over valid queries; AP is the mean precision at each hit;
INP is ``num_hits / (1 + rank of the last hit)``.

How it avoids the full sort: a query only needs the ranks of its few same-pid gallery items. The
rank of such an item is the number of gallery items ordered before it, i.e. with a smaller
``(distance, index)`` key. Everything farther than the query's farthest true match can be ignored
after one vectorised comparison; the few items left ("survivors") are located among the sorted
same-pid keys with one flat ``searchsorted`` over a chunk of queries and counted with ``bincount``.
The cost is one pass over the distance matrix plus work proportional to the survivors, instead of
``G log G`` per query.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ._parallel import cpu_workers
from .distance import check_chunk_size

__all__ = ["evaluate_rank", "ReIDEvaluator", "NoValidQueryError"]


class NoValidQueryError(ValueError):
    """Raised when no query has a true match left in the gallery after the protocol's filtering."""


def _as_label_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    else:
        arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _encode_pair(a: np.ndarray, b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Map two label arrays onto shared integer codes (works for ints and strings alike)."""
    try:
        _, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    except TypeError as exc:  # mixed, unorderable label types
        raise ValueError(f"{name} of query and gallery must be comparable labels: {exc}") from exc
    inv = inv.reshape(-1).astype(np.int64)
    return inv[: len(a)], inv[len(a) :]


def _as_distance_tensor(distmat: Any) -> torch.Tensor:
    if isinstance(distmat, torch.Tensor):
        d = distmat.detach()
    elif isinstance(distmat, np.ndarray):
        if distmat.dtype == np.bool_ or not np.issubdtype(distmat.dtype, np.number):
            raise ValueError(f"distmat must hold real numbers, got a numpy array of dtype {distmat.dtype}")
        arr = distmat if distmat.dtype.isnative else distmat.astype(distmat.dtype.newbyteorder("="))
        with warnings.catch_warnings():  # read-only arrays are only read here
            warnings.simplefilter("ignore", UserWarning)
            d = torch.from_numpy(arr)
    else:
        raise TypeError(f"distmat must be a numpy array or a torch tensor, got {type(distmat).__name__}")
    if d.ndim == 0:
        raise ValueError("distmat must be 2-D (num_query, num_gallery), got a 0-d scalar")
    if d.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(d.shape)}")
    if d.dtype == torch.bool or d.is_complex():
        raise ValueError(f"distmat must hold real numbers, got dtype {d.dtype}")
    return d


def _float32_order_key(v: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int64 keys in [0, 2**32) that sort exactly like the floats."""
    bits = (v + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits + (1 << 31)


def _chunk_ranks(
    d: torch.Tensor,
    same_idx: torch.Tensor,
    valid: torch.Tensor,
    removed: torch.Tensor,
    col_bits: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ranks among kept gallery items of each query's same-pid items, in (distance, index) order.

    Returns ``(rank, positive, order)``: ``rank`` and ``positive`` are (B, M) in sorted order; only
    entries where ``positive`` is true are meaningful.
    """
    b, m = same_idx.shape
    dev = d.device
    vals = d.gather(1, same_idx)
    if vals.is_floating_point() and bool(torch.isnan(vals[valid]).any()):
        raise ValueError(
            "distmat holds NaN at a query's same-identity gallery item; distances must be numbers"
        )
    positive = valid & ~removed
    if vals.is_floating_point():
        lowest = torch.tensor(float("-inf"), dtype=vals.dtype, device=dev)
    else:
        lowest = torch.tensor(torch.iinfo(vals.dtype).min, dtype=vals.dtype, device=dev)
    # rows without a true match get tmax = lowest: (almost) no survivors, and they are skipped later
    tmax = torch.where(positive, vals, lowest).amax(dim=1)
    # Survivors: every item that could be ordered before a true match. NaN compares false, so a
    # NaN distance ranks after every number, as in numpy's sort.
    rows, cols = (d <= tmax.unsqueeze(1)).nonzero(as_tuple=True)
    svals = d[rows, cols]

    if d.dtype == torch.float32:
        thr_vkey = _float32_order_key(vals)
        s_vkey = _float32_order_key(svals)
        val_bits = 32
    else:  # exact dense ranks of the (few) values involved, for any other dtype
        both = torch.cat([vals[valid], svals])
        uniq, inv = torch.unique(both, sorted=True, return_inverse=True)
        val_bits = max(1, int(uniq.numel()).bit_length())
        thr_vkey = torch.zeros_like(same_idx)
        thr_vkey[valid] = inv[: int(valid.sum())]
        s_vkey = inv[int(valid.sum()) :]

    shift_v = col_bits
    shift_r = col_bits + val_bits
    row_ids = torch.arange(b, device=dev, dtype=torch.int64).unsqueeze(1)
    thr_key = (row_ids << shift_r) | (thr_vkey << shift_v) | same_idx
    pad_key = (row_ids << shift_r) | ((1 << shift_r) - 1)
    thr_key = torch.where(valid, thr_key, pad_key.expand(b, m))
    sorted_key, order = torch.sort(thr_key, dim=1)
    surv_key = (rows << shift_r) | (s_vkey << shift_v) | cols
    pos_in_row = torch.searchsorted(sorted_key.reshape(-1), surv_key, right=True) - rows * m
    counts = torch.bincount(rows * (m + 1) + pos_in_row, minlength=b * (m + 1)).view(b, m + 1)
    before = counts.cumsum(dim=1)[:, :m]  # items ordered before the k-th same-pid item
    removed_s = removed.gather(1, order).to(torch.int64)
    removed_before = removed_s.cumsum(dim=1) - removed_s
    rank = before - removed_before
    return rank, positive.gather(1, order), order


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    chunk_size: int | None = None,
    return_per_query: bool = False,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Market-1501 CMC / mAP / mINP of a (Q, G) distance matrix (numpy or torch, any device).

    Returns ``{"mAP": float, "mINP": float, "cmc": np.ndarray, "num_valid_queries": int}``.
    ``cmc`` has length ``min(max_rank, G)`` (a ``max_rank`` beyond the gallery size is clamped);
    ``cmc[r]`` is the fraction of valid queries whose first true match has rank <= r (0-based), so
    ``cmc[0]`` is rank-1. Ties in distance are ordered by gallery index, exactly as a stable
    argsort; a NaN distance ranks after every number (as numpy sorts it), but NaN at a query's
    own identity raises ``ValueError``. With ``return_per_query`` the dict also holds ``AP`` and
    ``INP`` (Q,) arrays (NaN for skipped queries). Query chunks are spread over ``num_threads`` CPU worker threads
    (default: torch's thread count; torch runs single-threaded meanwhile).

    Raises :class:`NoValidQueryError` (a ``ValueError``) when no query keeps a true match.
    """
    d = _as_distance_tensor(distmat)
    num_q, num_g = d.shape
    qp, gp = _as_label_array(q_pids, "q_pids"), _as_label_array(g_pids, "g_pids")
    qc, gc = _as_label_array(q_camids, "q_camids"), _as_label_array(g_camids, "g_camids")
    checks = (("q_pids", qp, num_q), ("q_camids", qc, num_q), ("g_pids", gp, num_g), ("g_camids", gc, num_g))
    for name, arr, n in checks:
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries but distmat has shape {tuple(d.shape)}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"distmat is empty (shape {tuple(d.shape)}): need at least one query and one gallery item")
    if not isinstance(max_rank, (int, np.integer)) or isinstance(max_rank, bool) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    chunk_size = check_chunk_size(chunk_size, optional=True)
    max_rank = int(min(max_rank, num_g))
    qp, gp = _encode_pair(qp, gp, "pids")
    qc, gc = _encode_pair(qc, gc, "camids")

    dev = d.device
    compute_dtype = torch.float32 if d.dtype in (torch.float16, torch.bfloat16) else d.dtype
    col_bits = max(1, (num_g - 1).bit_length())
    # rows, values and columns share one int64 key; rank values may need up to 33 bits
    max_rows = 1 << max(0, 63 - 33 - col_bits)
    if chunk_size is None:
        chunk_size = max(1, min(1024, (4 << 20) // num_g))
    chunk_size = max(1, min(int(chunk_size), max_rows))

    # gallery indices grouped by pid: the same-pid items of a query form one contiguous run
    g_order = np.argsort(gp, kind="stable")
    g_sorted = gp[g_order]
    starts = np.searchsorted(g_sorted, qp, side="left")
    counts = np.searchsorted(g_sorted, qp, side="right") - starts
    g_order_t = torch.from_numpy(g_order).to(dev)
    gc_t = torch.from_numpy(gc).to(dev)

    def chunk_metrics(rng: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
        s, e = rng
        m = int(counts[s:e].max())
        if m == 0:
            return None
        chunk = d[s:e]
        if chunk.dtype != compute_dtype:
            chunk = chunk.to(compute_dtype)
        ar = np.arange(m)
        valid_np = ar[None, :] < counts[s:e, None]
        pos_np = np.where(valid_np, starts[s:e, None] + ar[None, :], 0)
        valid = torch.from_numpy(valid_np).to(dev)
        same_idx = g_order_t[torch.from_numpy(pos_np).to(dev)]
        q_cam = torch.from_numpy(qc[s:e]).to(dev)
        removed = valid & (gc_t[same_idx] == q_cam.unsqueeze(1))
        rank, positive, _ = _chunk_ranks(chunk, same_idx, valid, removed, col_bits)
        npos = positive.sum(dim=1)
        ok = (npos > 0).cpu().numpy()
        if not ok.any():
            return None
        big = torch.iinfo(torch.int64).max
        first = torch.where(positive, rank, big).amin(dim=1)
        last = torch.where(positive, rank, -1).amax(dim=1)
        hit_no = positive.to(torch.int64).cumsum(dim=1)  # 1-based index of each hit
        prec = torch.where(positive, hit_no.double() / (rank.double() + 1.0), 0.0)
        ap_c = prec.sum(dim=1) / npos.clamp(min=1).double()
        inp_c = npos.double() / (last.double() + 1.0)
        return (np.arange(s, e)[ok], first.cpu().numpy()[ok], ap_c.cpu().numpy()[ok], inp_c.cpu().numpy()[ok])

    first_hit = np.full(num_q, -1, dtype=np.int64)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    chunks = [(s, min(num_q, s + chunk_size)) for s in range(0, num_q, chunk_size)]
    with cpu_workers(dev, num_threads if len(chunks) > 1 else 1) as workers:
        for res in workers.map(chunk_metrics, chunks):
            if res is not None:
                idx, f, a, i = res
                first_hit[idx], ap[idx], inp[idx] = f, a, i

    valid_q = first_hit >= 0
    num_valid = int(valid_q.sum())
    if num_valid == 0:
        raise NoValidQueryError(_explain_no_valid(qp, gp, qc, gc))
    hist = np.bincount(np.minimum(first_hit[valid_q], max_rank), minlength=max_rank + 1)
    cmc = np.cumsum(hist[:max_rank]) / num_valid
    out: dict[str, Any] = {
        "mAP": float(np.mean(ap[valid_q])),
        "mINP": float(np.mean(inp[valid_q])),
        "cmc": cmc.astype(np.float64),
        "num_valid_queries": num_valid,
    }
    if return_per_query:
        out["AP"] = ap
        out["INP"] = inp
    return out


def _explain_no_valid(qp: np.ndarray, gp: np.ndarray, qc: np.ndarray, gc: np.ndarray) -> str:
    shared = np.isin(qp, gp)
    n_q = len(qp)
    if not shared.any():
        return (
            f"no valid query: none of the {n_q} queries has its identity (pid) in the gallery, so "
            "there is nothing to retrieve; are query and gallery pids from the same labelling?"
        )
    cams_q, cams_g = np.unique(qc), np.unique(gc)
    hint = (
        f" query and gallery use a single camera ({len(cams_q)} query / {len(cams_g)} gallery camera ids)."
        if len(cams_q) == 1 and len(cams_g) == 1
        else ""
    )
    return (
        f"no valid query: {int(shared.sum())} of {n_q} queries have their pid in the gallery, but all "
        "of those gallery images come from the query's own camera, and the Market-1501 protocol "
        "discards same-pid same-camera gallery items. Is there one camera for query and gallery, or "
        f"are camera ids missing?{hint}"
    )


class ReIDEvaluator:
    """fast-reid style evaluator: ``reset()``, ``process(...)`` per batch, ``evaluate()`` at the end.

    Features stream in batch by batch with their pids, camids and split ("query" or "gallery",
    for the whole batch or per sample); ``evaluate`` L2-normalises them (``normalize=True``),
    computes distances in chunks (or k-reciprocal re-ranked distances with ``rerank=True``) and
    returns the metrics of :func:`evaluate_rank` plus ``rank-1``, ``rank-5`` and ``rank-10``.
    """

    def __init__(
        self,
        max_rank: int = 50,
        normalize: bool = True,
        rerank: bool = False,
        k1: int = 50,
        k2: int = 15,
        lambda_value: float = 0.3,
        device: str | torch.device | None = None,
    ) -> None:
        self.max_rank = max_rank
        self.normalize = normalize
        self.rerank = rerank
        self.k1, self.k2, self.lambda_value = k1, k2, lambda_value
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Forget all processed batches."""
        self._feats: dict[str, list[torch.Tensor]] = {"query": [], "gallery": []}
        self._pids: dict[str, list[np.ndarray]] = {"query": [], "gallery": []}
        self._camids: dict[str, list[np.ndarray]] = {"query": [], "gallery": []}

    def process(
        self,
        features: Any,
        pids: Any,
        camids: Any,
        split: str | Sequence[str] | Iterable[str],
    ) -> None:
        """Add one batch of features (B, D) with its pids, camids and split(s)."""
        from .distance import as_feature_tensor

        f = as_feature_tensor(features).to("cpu")
        p = _as_label_array(pids, "pids")
        c = _as_label_array(camids, "camids")
        if not (len(p) == len(c) == f.shape[0]):
            raise ValueError(
                f"batch sizes differ: {f.shape[0]} features, {len(p)} pids, {len(c)} camids"
            )
        if isinstance(split, str):
            splits = np.full(f.shape[0], split, dtype=object)
        else:
            splits = np.asarray(list(split), dtype=object)
            if len(splits) != f.shape[0]:
                raise ValueError(f"split has {len(splits)} entries for a batch of {f.shape[0]}")
        bad = set(splits.tolist()) - {"query", "gallery"}
        if bad:
            raise ValueError(f"split must be 'query' or 'gallery', got {sorted(map(str, bad))}")
        for name in ("query", "gallery"):
            sel = splits == name
            if sel.any():
                sel_t = torch.from_numpy(sel.astype(bool))
                self._feats[name].append(f[sel_t])
                self._pids[name].append(p[sel])
                self._camids[name].append(c[sel])

    def collected(self) -> Mapping[str, Any]:
        """Concatenated features, pids and camids per split (as processed, not normalised)."""
        out: dict[str, Any] = {}
        for name in ("query", "gallery"):
            if not self._feats[name]:
                raise ValueError(f"no {name} samples were processed; evaluation needs both splits")
            out[f"{name}_features"] = torch.cat(self._feats[name])
            out[f"{name}_pids"] = np.concatenate(self._pids[name])
            out[f"{name}_camids"] = np.concatenate(self._camids[name])
        return out

    def evaluate(self) -> dict[str, Any]:
        """Metrics over everything processed since the last ``reset``."""
        from .distance import pairwise_distance
        from .rerank import re_ranking

        data = self.collected()
        qf, gf = data["query_features"], data["gallery_features"]
        if self.rerank:
            distmat = re_ranking(
                qf, gf, k1=self.k1, k2=self.k2, lambda_value=self.lambda_value, device=self.device,
                normalize_features=self.normalize,
            )
        else:
            distmat = pairwise_distance(qf, gf, normalize_features=self.normalize, device=self.device)
        res = evaluate_rank(
            distmat, data["query_pids"], data["gallery_pids"], data["query_camids"],
            data["gallery_camids"], max_rank=self.max_rank,
        )
        cmc = res["cmc"]
        for r in (1, 5, 10):
            res[f"rank-{r}"] = float(cmc[min(r, len(cmc)) - 1])
        return res
