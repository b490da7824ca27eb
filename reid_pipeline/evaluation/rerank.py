"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) in memory linear in the number of images.

The published dense algorithm (the version CLIP-ReID and torchreid ship) materialises several
N x N matrices (N = queries + gallery): distances, the full argsort, the encoding V, its query
expanded copy and the Jaccard distances. This implementation computes the same quantities with

* one blocked pass over the N x N distances that keeps only each row's nearest neighbours (exact,
  ties by index as a stable argsort), its maximum (the published column normalisation; the
  distance matrix is symmetric) and the query x gallery part (the output), evaluating each
  symmetric block pair once;
* the encoding V as a sparse matrix: each row holds only its k-reciprocal expansion set, so V has
  about N * k1 entries; local query expansion and the inverted index stay sparse too;
* Jaccard distances for a chunk of queries at a time, accumulated into a (chunk, G) buffer.

Peak memory is the (Q, G) float32 result plus O(N * k1 * k2) for the sparse encodings and
O(block^2 + chunk * N) of work buffers per worker, never N^2. On the CPU the work is spread over
worker threads that each run torch single-threaded (independent blocks and chunks, no barrier
per operation), and results are assembled in a fixed order, so runs are bit-reproducible. The
ranking is that of the published algorithm; distances agree with a float32 dense evaluation up to
rounding (the published version stores V and the Jaccard term in float16, about 1e-3 off both).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from ._parallel import Workers, cpu_workers
from .distance import as_feature_tensor, check_chunk_size

__all__ = ["re_ranking"]

_KEY_NONE = torch.iinfo(torch.int64).max
_IDX_BITS = 31
_FREE = torch.iinfo(torch.int32).max


# ----------------------------------------------------------------------------------------------
# execution helpers


class _StageClock:
    """Records wall-clock seconds per stage into an optional dict."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self.t0 = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.t0
        self.t0 = now


def _joined(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``torch.cat([q, g])``, without a copy when ``g`` directly follows ``q`` in one buffer
    (e.g. views of a single (Q + G, D) feature matrix)."""
    if (
        q.is_contiguous() and g.is_contiguous() and q.device == g.device and q.dtype == g.dtype
        and q.untyped_storage().data_ptr() == g.untyped_storage().data_ptr()
        and g.storage_offset() == q.storage_offset() + q.numel()
    ):
        return q.new_empty(0).set_(q.untyped_storage(), q.storage_offset(), (q.shape[0] + g.shape[0], q.shape[1]))
    return torch.cat([q, g])


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


# ----------------------------------------------------------------------------------------------
# stage 1: exact nearest neighbours and row maxima from symmetric distance blocks


def _float32_sort_key(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (value, index) lexicographically; value float32, index < 2**31."""
    bits = (v.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)
    return (bits << _IDX_BITS) | idx


def _decode_key(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_float32_sort_key`: (float32 values, int64 indices); empty keys -> inf."""
    bits = (key >> _IDX_BITS) - (1 << 31)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    vals = bits.to(torch.int32).view(torch.float32)
    vals = torch.where(key == _KEY_NONE, float("inf"), vals)
    return vals, key & ((1 << _IDX_BITS) - 1)


def _merge_candidates(top_key: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> None:
    """Merge candidate ``keys`` of ``rows`` (ascending) into the per-row sorted top-k keys."""
    if keys.numel() == 0:
        return
    k = top_key.shape[1]
    urows, counts = torch.unique_consecutive(rows, return_counts=True)
    local = torch.repeat_interleave(torch.arange(urows.numel(), device=rows.device), counts)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[local]
    pad = torch.full((urows.numel(), k + int(counts.max())), _KEY_NONE, dtype=torch.int64, device=rows.device)
    pad[:, :k] = top_key.index_select(0, urows)
    pad[local, k + pos] = keys
    top_key[urows] = pad.sort(dim=1).values[:, :k]


def _group_min(d: torch.Tensor, g: int, transposed: bool) -> torch.Tensor:
    """Minima over runs of ``g`` consecutive entries along each row of ``d`` (of ``d.t()`` if
    ``transposed``), shape (rows, runs); the last run may be shorter."""
    if transposed:
        r = d.shape[0]
        main = r // g * g
        parts = [d[:main].view(r // g, g, d.shape[1]).amin(dim=1)] if main else []
        if main < r:
            parts.append(d[main:].amin(dim=0, keepdim=True))
        return torch.cat(parts, dim=0).t()
    c = d.shape[1]
    main = c // g * g
    parts = [d[:, :main].reshape(d.shape[0], c // g, g).amin(dim=2)] if main else []
    if main < c:
        parts.append(d[:, main:].amin(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


def _smallest_with_tie_flag(
    vals: torch.Tensor, idx: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k smallest values per row, ascending, with their indices and a flag for rows whose k-th
    and (k+1)-th smallest values tie (where the choice among equal values is arbitrary)."""
    take = min(k + 1, vals.shape[1])
    v, p = torch.topk(vals, take, dim=1, largest=False, sorted=False)
    v, order = torch.sort(v, dim=1)
    p = torch.gather(p, 1, order)
    if idx is not None:
        p = torch.gather(idx, 1, p)
    kk = min(k, vals.shape[1])
    if take > kk:
        tied = v[:, kk - 1] == v[:, kk]
    else:
        tied = torch.zeros(vals.shape[0], dtype=torch.bool, device=vals.device)
    return v[:, :kk], p[:, :kk], tied


def _block_candidates(
    d: torch.Tensor, k: int, col0: int, transposed: bool, group: int = 8
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k candidates of each row of a contiguous block ``d`` (of ``d.t()`` if ``transposed``).

    Returns ``(keys (rows, k'), tied_rows, extra_rows, extra_keys)``: the k smallest entries as
    (distance, index) keys, and for rows where a tie makes topk's choice ambiguous, every entry up
    to the row's k-th value (``extra``), which replaces ``keys`` for those rows. The k smallest
    entries of a row lie in the k runs of ``group`` entries with the smallest minima, so only those
    runs are gathered and searched.
    """
    num_rows, num_cols = (d.shape[1], d.shape[0]) if transposed else d.shape
    dev = d.device
    if num_cols > 2 * k * group:
        gmin = _group_min(d, group, transposed)
        _, runs, tied = _smallest_with_tie_flag(gmin, None, k)
        cols = (runs.unsqueeze(2) * group + torch.arange(group, device=dev)).reshape(num_rows, -1)
        inside = cols < num_cols
        cols = cols.clamp_(max=num_cols - 1)
        rows = torch.arange(num_rows, device=dev).unsqueeze(1)
        flat = cols * d.shape[1] + rows if transposed else rows * num_cols + cols
        cand = d.reshape(-1).index_select(0, flat.reshape(-1)).view(flat.shape)
        cand = cand.masked_fill_(~inside, float("inf"))
        vals, idx, tied2 = _smallest_with_tie_flag(cand, cols, k)
        tied |= tied2
    else:
        vals, idx, tied = _smallest_with_tie_flag(d.t() if transposed else d, None, k)
    keys = _float32_sort_key(vals, idx + col0)
    tied_rows = tied.nonzero().squeeze(1)
    if tied_rows.numel() == 0:
        empty = tied_rows.new_empty(0)
        return keys, tied_rows, empty, empty
    sub = (d.t() if transposed else d).index_select(0, tied_rows)
    kth = torch.kthvalue(sub, min(k, num_cols), dim=1, keepdim=True).values
    r, c = (sub <= kth).nonzero(as_tuple=True)
    return keys, tied_rows, tied_rows.index_select(0, r), _float32_sort_key(sub[r, c], c + col0)


def _merge_block(
    top_key: torch.Tensor, r0: int, cands: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
) -> None:
    """Merge the output of :func:`_block_candidates` into rows ``r0..`` of ``top_key``."""
    keys, tied_rows, extra_rows, extra_keys = cands
    k = top_key.shape[1]
    prev = top_key[r0 : r0 + keys.shape[0]]
    saved = prev.index_select(0, tied_rows) if tied_rows.numel() else None
    prev.copy_(torch.cat([prev, keys], dim=1).sort(dim=1).values[:, :k])
    if saved is not None:
        top_key[r0 + tied_rows] = saved
        _merge_candidates(top_key, extra_rows + r0, extra_keys)


def _knn_rowmax_and_qg(
    feats: torch.Tensor, sq: torch.Tensor, k: int, num_q: int, block: int, out_qg: torch.Tensor,
    workers: Workers,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest ``k`` neighbours (ascending distance, ties by index, as a stable argsort) and
    maximum distance of every row.

    Each block pair (I, J) with I <= J is computed once and used for rows I and, transposed, for
    rows J. The query x gallery part of the distances is written into ``out_qg`` (on the CPU).
    The result does not depend on the order in which block pairs are merged.
    """
    n = feats.shape[0]
    dev = feats.device
    top_key = torch.full((n, k), _KEY_NONE, dtype=torch.int64, device=dev)
    row_max = torch.full((n,), float("-inf"), device=dev)
    blocks = _chunks(n, block)
    locks = [threading.Lock() for _ in blocks]
    pairs = [(bi, bj) for bi in range(len(blocks)) for bj in range(bi, len(blocks))]

    def task(pair: tuple[int, int]) -> None:
        bi, bj = pair
        (i0, i1), (j0, j1) = blocks[bi], blocks[bj]
        d = torch.addmm(sq[i0:i1, None] + sq[None, j0:j1], feats[i0:i1], feats[j0:j1].t(), beta=1.0, alpha=-2.0)
        cands = _block_candidates(d, k, j0, transposed=False)
        dmax = d.amax(dim=1)
        with locks[bi]:
            _merge_block(top_key, i0, cands)
            torch.maximum(row_max[i0:i1], dmax, out=row_max[i0:i1])
        if bj != bi:
            cands = _block_candidates(d, k, i0, transposed=True)
            dmax = d.amax(dim=0)
            with locks[bj]:
                _merge_block(top_key, j0, cands)
                torch.maximum(row_max[j0:j1], dmax, out=row_max[j0:j1])
        qr1, gc0 = min(i1, num_q), max(j0, num_q)  # query rows of I x gallery columns of J
        if i0 < qr1 and gc0 < j1:
            out_qg[i0:qr1, gc0 - num_q : j1 - num_q] = d[: qr1 - i0, gc0 - j0 :].to("cpu")

    workers.map(task, pairs)
    top_v, top_i = _decode_key(top_key)
    return top_v, top_i, row_max


# ----------------------------------------------------------------------------------------------
# stage 2: sparse k-reciprocal encoding


def _reciprocal_mask(nbrs: torch.Tensor) -> torch.Tensor:
    """mask[i, a] = (i is among the neighbours of nbrs[i, a]) for a (N, k) neighbour table."""
    n, k = nbrs.shape
    rows = torch.arange(n, device=nbrs.device, dtype=torch.int64).unsqueeze(1)
    table = (rows * n + nbrs.sort(dim=1).values).reshape(-1)  # globally sorted (row, neighbour)
    query = (nbrs * n + rows).reshape(-1)
    pos = torch.searchsorted(table, query).clamp_(max=table.numel() - 1)
    return (table.index_select(0, pos) == query).view(n, k)


class _Scratch:
    """Reusable (rows x N) work buffers for a chunk of rows: an int32 mark table (all ``_FREE``
    between uses) and a float32 accumulator (all zero between uses). Users reset exactly the
    entries they touched, so no pass over the whole buffer is ever needed. One per worker."""

    def __init__(self, rows: int, n: int, device: torch.device) -> None:
        self.mark = torch.full((rows * n,), _FREE, dtype=torch.int32, device=device)
        self.acc = torch.zeros(rows * n, device=device)

    def first_occurrence(self, keys: torch.Tensor) -> torch.Tensor:
        """Mask of the first occurrence of each key (deterministic, keeps the order of ``keys``)."""
        pos = torch.arange(keys.numel(), device=keys.device, dtype=torch.int32)
        self.mark.scatter_reduce_(0, keys, pos, reduce="amin")
        first = self.mark.index_select(0, keys) == pos
        self.mark.scatter_(0, keys, _FREE)
        return first


class _ScratchPool:
    """One :class:`_Scratch` per worker thread, created on first use."""

    def __init__(self, rows: int, n: int, device: torch.device) -> None:
        self.rows, self.n, self.device = rows, n, device
        self.local = threading.local()

    def get(self) -> _Scratch:
        s = getattr(self.local, "scratch", None)
        if s is None:
            s = self.local.scratch = _Scratch(self.rows, self.n, self.device)
        return s


def _expanded_sets(
    r1: torch.Tensor, m1: torch.Tensor, rh: torch.Tensor, mh: torch.Tensor, r0: int, r_end: int,
    scratch: _Scratch,
) -> torch.Tensor:
    """k-reciprocal expansion sets of rows [r0, r_end) as keys ``local_row * N + col``, grouped
    by row (each row: its reciprocal neighbours, then the added half-neighbourhoods).

    K_i = reciprocal k1-neighbours of i; each candidate c in K_i adds its reciprocal
    round(k1/2)-neighbours H_c when |H_c & K_i| > 2/3 |H_c| (as the published algorithm).
    """
    n = r1.shape[0]
    dev = r1.device
    b = r_end - r0
    base = torch.arange(b, device=dev, dtype=torch.int64) * n
    cand = r1[r0:r_end]  # (B, k1+1)
    cand_ok = m1[r0:r_end]
    k_keys = base[:, None] + cand
    k_set = k_keys[cand_ok]
    scratch.mark.scatter_(0, k_set, 0)  # 0 marks membership of K_i
    flat = cand.reshape(-1)
    h = rh.index_select(0, flat).view(*cand.shape, rh.shape[1])  # (B, k1+1, kh+1)
    h_ok = mh.index_select(0, flat).view(h.shape)
    h_keys = base[:, None, None] + h
    in_k = (scratch.mark.index_select(0, h_keys.reshape(-1)) == 0).view(h.shape) & h_ok
    scratch.mark.scatter_(0, k_set, _FREE)
    inter = in_k.sum(dim=2).to(torch.float64)
    size = h_ok.sum(dim=2).to(torch.float64)
    accept = cand_ok & (inter > (2.0 / 3.0) * size)
    add = h_ok & accept.unsqueeze(2)
    # per row: [K_i candidates | half-neighbourhoods of accepted candidates], then dedupe
    keys = torch.cat([k_keys, h_keys.reshape(b, -1)], dim=1)
    valid = torch.cat([cand_ok, add.reshape(b, -1)], dim=1)
    keys = keys[valid]
    return keys[scratch.first_occurrence(keys)]


def _pair_distances(
    feats: torch.Tensor, sq: torch.Tensor, r0: int, b: int, keys: torch.Tensor, top_v: torch.Tensor,
    top_i: torch.Tensor, scratch: _Scratch, group: int = 16,
) -> torch.Tensor:
    """Squared distances of the pairs ``keys = local_row * N + col`` (rows from ``r0``, grouped).

    Pairs among the stored nearest neighbours are looked up; the others are computed from the
    features, ``group`` rows at a time as one small matmul against their pairs' columns.
    """
    n = feats.shape[0]
    dev = feats.device
    k = top_i.shape[1]
    slots = ((torch.arange(b, device=dev, dtype=torch.int64) * n)[:, None] + top_i[r0 : r0 + b]).reshape(-1)
    scratch.mark.scatter_(0, slots, torch.arange(k, device=dev, dtype=torch.int32).repeat(b))
    slot = scratch.mark.index_select(0, keys)
    scratch.mark.scatter_(0, slots, _FREE)
    found = slot != _FREE
    rows = torch.div(keys, n, rounding_mode="floor")
    cols = keys - rows * n
    flat_pos = rows * k + torch.where(found, slot, 0).to(torch.int64)
    out = torch.where(found, top_v[r0 : r0 + b].reshape(-1).index_select(0, flat_pos), 0.0)
    miss = (~found).nonzero().squeeze(1)
    if miss.numel() == 0:
        return out
    mr, mc = rows.index_select(0, miss) + r0, cols.index_select(0, miss)
    urows, inv = torch.unique_consecutive(mr, return_inverse=True)
    gid = torch.div(inv, group, rounding_mode="floor")
    num_groups = (urows.numel() + group - 1) // group
    bounds = torch.searchsorted(gid, torch.arange(num_groups + 1, device=dev)).tolist()
    dots = torch.empty(miss.numel(), device=dev)
    for g in range(num_groups):
        lo, hi = bounds[g], bounds[g + 1]
        rf = feats.index_select(0, urows[g * group : (g + 1) * group])
        prod = feats.index_select(0, mc[lo:hi]) @ rf.t()  # (pairs of this group, its rows)
        dots[lo:hi] = prod.gather(1, (inv[lo:hi] - g * group).unsqueeze(1)).squeeze(1)
    out[miss] = sq.index_select(0, mr) + sq.index_select(0, mc) - 2.0 * dots
    return out


def _gather_rows(ptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry positions of CSR ``rows`` (concatenated) and, per entry, its index into ``rows``."""
    starts = ptr.index_select(0, rows)
    lens = ptr.index_select(0, rows + 1) - starts
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lens)
    shift = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    return shift.add_(torch.arange(owner.numel(), device=rows.device)), owner


def _csr(parts: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int, dev: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate per-chunk (cols, vals, row lengths) into CSR (ptr, cols, vals)."""
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    ptr[1:] = torch.cumsum(torch.cat([p[2] for p in parts]), 0)
    return ptr, torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ----------------------------------------------------------------------------------------------
# stage 3: Jaccard distances through a padded inverted index


def _padded_inverted_index(
    v_ptr: torch.Tensor, v_cols: torch.Tensor, v_vals: torch.Tensor, num_q: int, n: int,
    piece: int = 1 << 20,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor]:
    """Inverted index of the gallery rows of a CSR matrix, as padded tables.

    Columns are grouped by their number of gallery entries into tables of width W
    (C columns x W); each table holds the gallery row (int32) and value of every entry, padded
    with row 0 and value 0, which add ``min(a, 0) = 0`` to any Jaccard sum. Within a column,
    entries keep gallery order. Returns ``(tables [(rows (C, W), vals (C, W))], table of each
    column (-1: none), slot of each column in its table)``.
    """
    dev = v_cols.device
    g_first = int(v_ptr[num_q])
    num_entries = v_cols.numel() - g_first
    col_len = torch.zeros(n, dtype=torch.int64, device=dev)
    for p0 in range(g_first, v_cols.numel(), piece):
        col_len += torch.bincount(v_cols[p0 : p0 + piece].to(torch.int64), minlength=n)
    nonempty = (col_len > 0).nonzero().squeeze(1)
    col_table = torch.full((n,), -1, dtype=torch.int64, device=dev)
    col_slot = torch.zeros(n, dtype=torch.int64, device=dev)
    col_start = torch.zeros(n, dtype=torch.int64, device=dev)  # start of the column in the flat buffer
    # widths in half-octave steps (8, 12, 16, 23, 32, ...): at most ~41% padding
    lens = torch.clamp(col_len.index_select(0, nonempty), min=8).double()
    bucket = torch.ceil(2.0 * torch.log2(lens) - 1e-9).long()
    shapes, total = [], 0
    for t, bk in enumerate(torch.unique(bucket).tolist()):
        cols = nonempty[bucket == bk]
        w = int(np.ceil(2.0 ** (bk / 2.0) - 1e-9))
        w = max(w, int(col_len.index_select(0, cols).max()))
        col_table[cols] = t
        slot = torch.arange(cols.numel(), device=dev)
        col_slot[cols] = slot
        col_start[cols] = total + slot * w
        shapes.append((cols.numel(), w))
        total += cols.numel() * w
    rows_flat = torch.zeros(total, dtype=torch.int32, device=dev)
    vals_flat = torch.zeros(total, dtype=v_vals.dtype, device=dev)
    filled = torch.zeros(n, dtype=torch.int64, device=dev)  # entries placed so far per column
    g_ptr = v_ptr[num_q:] - g_first
    for p0 in range(0, num_entries, piece):
        col = v_cols[g_first + p0 : g_first + p0 + piece].to(torch.int64)
        m = col.numel()
        # rank of each entry among the entries of its column in this piece (gallery order)
        srt, perm = torch.sort(col, stable=True)
        idx = torch.arange(m, device=dev)
        new_run = torch.ones(m, dtype=torch.bool, device=dev)
        new_run[1:] = srt[1:] != srt[:-1]
        rank = torch.empty(m, dtype=torch.int64, device=dev)
        rank[perm] = idx - torch.cummax(torch.where(new_run, idx, 0), dim=0).values
        dest = col_start.index_select(0, col) + filled.index_select(0, col) + rank
        filled += torch.bincount(col, minlength=n)
        entries = torch.arange(p0, p0 + m, device=dev)
        rows_flat[dest] = (torch.searchsorted(g_ptr, entries, right=True) - 1).to(torch.int32)
        vals_flat[dest] = v_vals[g_first + p0 : g_first + p0 + m]
    del filled
    tables, pos = [], 0
    for c, w in shapes:
        tables.append((rows_flat[pos : pos + c * w].view(c, w), vals_flat[pos : pos + c * w].view(c, w)))
        pos += c * w
    return tables, col_table, col_slot


# ----------------------------------------------------------------------------------------------
# public API


def re_ranking(
    q_feats: Any,
    g_feats: Any,
    k1: int = 50,
    k2: int = 15,
    lambda_value: float = 0.3,
    device: str | torch.device | None = None,
    query_chunk: int | None = None,
    block_size: int | None = None,
    num_threads: int | None = None,
    normalize_features: bool = True,
    timings: dict[str, float] | None = None,
) -> np.ndarray:
    """k-reciprocal re-ranked (Q, G) distances, as float32 numpy.

    Same steps and defaults as CLIP-ReID's ``re_ranking`` (k1=50, k2=15, lambda=0.3): squared
    Euclidean distances between the features, L2-normalised first as in CLIP-ReID's evaluation
    (``normalize_features=False`` uses them as given, like the bare published function), each
    row divided by its maximum, k-reciprocal neighbours with the round(k1/2)
    expansion rule (2/3 overlap), Gaussian-kernel encoding V, local query expansion over k2
    neighbours, Jaccard distance; result ``jaccard * (1 - lambda) + original * lambda``.

    Memory grows like N * k1 * k2 (sparse) plus ``block_size**2`` and ``query_chunk x G`` buffers
    besides the output, never N^2 (defaults: 2048 and 8M / G rows on the CPU, larger on a GPU).
    Runs on ``device`` (e.g. ``"cuda"``; default: the device of ``q_feats``). On the CPU,
    ``num_threads`` worker threads (default: torch's thread count) share the blocks and chunks,
    each running torch single-threaded. Query and gallery features that are consecutive views of
    one tensor are used without a concatenation copy (with ``normalize_features=False``). Pass a
    dict as ``timings`` to receive the seconds per stage.
    """
    for name, val in (("k1", k1), ("k2", k2)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if not 0.0 <= float(lambda_value) <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    block_size = check_chunk_size(block_size, "block_size", optional=True)
    query_chunk = check_chunk_size(query_chunk, "query_chunk", optional=True)
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    qt = as_feature_tensor(q_feats, "query features")
    gt = as_feature_tensor(g_feats, "gallery features")
    if qt.shape[1] != gt.shape[1]:
        raise ValueError(f"query and gallery features differ in dimension: {qt.shape[1]} vs {gt.shape[1]}")
    num_q, num_g = qt.shape[0], gt.shape[0]
    if num_q == 0 or num_g == 0:
        raise ValueError(f"re_ranking needs queries and gallery items, got {num_q} and {num_g}")
    dev = torch.device(device) if device is not None else qt.device
    n = num_q + num_g
    if n >= 1 << _IDX_BITS:
        raise ValueError(f"re_ranking supports fewer than {1 << _IDX_BITS} images, got {n}")
    feats = _joined(qt.to(dev, torch.float32), gt.to(dev, torch.float32))
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("features contain NaN or inf")
    if normalize_features:
        feats = torch.nn.functional.normalize(feats, p=2.0, dim=1)
    on_gpu = dev.type != "cpu"
    if block_size is None:  # distance blocks of block_size^2 float32: 16 MB (256 MB on a GPU)
        block_size = 8192 if on_gpu else 2048
    if query_chunk is None:  # (chunk, G) float32 buffers: 32 MB per worker (512 MB on a GPU)
        query_chunk = max(1, min(4096 if on_gpu else 256, ((128 if on_gpu else 8) << 20) // num_g))
    out = np.empty((num_q, num_g), dtype=np.float32)
    with torch.no_grad(), cpu_workers(dev, num_threads) as workers:
        _re_ranking(feats, num_q, int(k1), int(k2), float(lambda_value), query_chunk, block_size,
                    workers, torch.from_numpy(out), _StageClock(timings, dev))
    return out


def _re_ranking(
    feats: torch.Tensor, num_q: int, k1: int, k2: int, lam: float, query_chunk: int, block_size: int,
    workers: Workers, out: torch.Tensor, clock: _StageClock,
) -> None:
    n, dev = feats.shape[0], feats.device
    num_g = n - num_q
    sq = (feats * feats).sum(dim=1)
    k1p = min(k1 + 1, n)
    khp = min(int(np.around(k1 / 2)) + 1, n)
    k2e = min(k2, n)

    # 1. exact neighbours (first max(k1 + 1, k2) of a stable argsort per row) and row maxima;
    #    the query x gallery distances go straight into ``out``
    top_v, top_i, row_max = _knn_rowmax_and_qg(feats, sq, max(k1p, k2e), num_q, block_size, out, workers)
    row_max = row_max.clamp(min=torch.finfo(torch.float32).tiny)
    r1, rh = top_i[:, :k1p], top_i[:, :khp]
    m1, mh = workers.map(_reciprocal_mask, [r1, rh])
    clock.lap("neighbours")

    # 2. sparse encoding V: Gaussian weights over each row's expansion set
    chunk = max(1, min(4096, n, ((64 if dev.type != "cpu" else 4) << 20) // n))
    scratch = _ScratchPool(chunk, n, dev)

    def encode(rng: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r0, r_end = rng
        s = scratch.get()
        keys = _expanded_sets(r1, m1, rh, mh, r0, r_end, s)
        dist = _pair_distances(feats, sq, r0, r_end - r0, keys, top_v, top_i, s)
        er = torch.div(keys, n, rounding_mode="floor")
        w = torch.exp(-(dist / row_max[r0:r_end].index_select(0, er)))
        wsum = torch.zeros(r_end - r0, device=dev).index_add_(0, er, w)
        cols = (keys - er * n).to(torch.int32)
        return cols, w / wsum.index_select(0, er), torch.bincount(er, minlength=r_end - r0)

    v_ptr, v_cols, v_vals = _csr(workers.map(encode, _chunks(n, chunk)), n, dev)
    m1 = mh = r1 = rh = None  # free the neighbour sets (the closures above are done with them)
    clock.lap("encoding")

    # 3. local query expansion: V_qe[i] = mean of V over i's k2 nearest neighbours
    if k2 != 1:
        def expand(rng: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r0, r_end = rng
            s = scratch.get()
            eidx, owner = _gather_rows(v_ptr, top_i[r0:r_end, :k2e].reshape(-1))
            cols = v_cols.index_select(0, eidx).to(torch.int64)
            tgt = torch.div(owner, k2e, rounding_mode="floor").mul_(n).add_(cols)
            ukeys = tgt[s.first_occurrence(tgt)]
            s.acc.index_add_(0, tgt, v_vals.index_select(0, eidx))
            vals = s.acc.index_select(0, ukeys).div_(k2e)
            s.acc.scatter_(0, ukeys, 0.0)
            rr = torch.div(ukeys, n, rounding_mode="floor")
            return (ukeys - rr * n).to(torch.int32), vals, torch.bincount(rr, minlength=r_end - r0)

        v_ptr, v_cols, v_vals = _csr(workers.map(expand, _chunks(n, chunk)), n, dev)
    top_v = top_i = scratch = None  # free the k-NN lists and the scratch buffers
    clock.lap("query_expansion")

    # 4. inverted index over the gallery rows of V_qe, padded into a few tables
    tables, col_table, col_slot = _padded_inverted_index(v_ptr, v_cols, v_vals, num_q, n)
    q_end = int(v_ptr[num_q])  # only the query rows of V_qe are needed from here on
    v_ptr, v_cols, v_vals = v_ptr[: num_q + 1].clone(), v_cols[:q_end].clone(), v_vals[:q_end].clone()
    clock.lap("inverted_index")

    # 5. Jaccard distance for query chunks, combined with the normalised original distance
    pair_budget = 1 << 21

    def jaccard(rng: tuple[int, int]) -> None:
        q0, q1 = rng
        b = q1 - q0
        acc = torch.zeros(b * num_g, device=dev)
        e0, e1 = int(v_ptr[q0]), int(v_ptr[q1])
        e_cols, e_vals = v_cols[e0:e1].to(torch.int64), v_vals[e0:e1]
        e_base = torch.repeat_interleave(
            torch.arange(0, b * num_g, num_g, device=dev, dtype=torch.int32), v_ptr[q0 + 1 : q1 + 1] - v_ptr[q0:q1]
        )
        e_tab = col_table.index_select(0, e_cols)
        for t, (rows_pad, vals_pad) in enumerate(tables):
            sel = (e_tab == t).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            slots = col_slot.index_select(0, e_cols.index_select(0, sel))
            a = e_vals.index_select(0, sel).unsqueeze(1)
            base = e_base.index_select(0, sel).unsqueeze(1)
            step = max(1, pair_budget // rows_pad.shape[1])
            for s0 in range(0, sel.numel(), step):
                sl = slots[s0 : s0 + step]
                mins = torch.minimum(vals_pad.index_select(0, sl), a[s0 : s0 + step])
                tgt = rows_pad.index_select(0, sl).add_(base[s0 : s0 + step])
                acc.index_add_(0, tgt.view(-1), mins.view(-1))
        tmin = acc.view(b, num_g)
        # final = (1 - tmin / (2 - tmin)) * (1 - lambda) + original / row_max * lambda, in place
        jac = tmin.div_(torch.sub(2.0, tmin)).neg_().add_(1.0).mul_(1.0 - lam)
        orig = out[q0:q1].to(dev).div_(row_max[q0:q1, None]).mul_(lam)
        out[q0:q1] = jac.add_(orig).to("cpu")

    workers.map(jaccard, _chunks(num_q, query_chunk))
    clock.lap("jaccard")
