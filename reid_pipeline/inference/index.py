"""``GalleryIndex``: L2-normalised gallery features with paths and optional ids, searchable.

* **Exact search** (default) computes the evaluation's distance — squared Euclidean on normalised
  features, ``||q||² + ||g||² - 2 q·g`` with the same ``addmm`` as
  :func:`~reid_pipeline.evaluation.pairwise_distance` — over the gallery in chunks (multiples of 64
  rows; by default ``2**24 / queries`` rows, i.e. a whole 1M gallery for up to 16 queries), and keeps
  the top-k per query with one int64 key per (distance, gallery index): ties are broken by gallery
  index exactly like the stable argsort the evaluation's ranking uses. When the gallery fits one
  chunk, the distances of a query batch are pairwise_distance's for that batch bit for bit on the
  CPU (tested); across chunks, or for a query searched alone instead of inside a batch, BLAS may
  round differently by about one float32 ulp of 2.0 (2.4e-7), which can swap exact near-ties. Memory: one ``queries × chunk``
  block, never ``queries × gallery``.
* **Re-ranking** (``rerank=True``) runs the project's sparse k-reciprocal
  :func:`~reid_pipeline.evaluation.re_ranking` over the queries and the gallery (the whole gallery
  up to ``RERANK_FULL_LIMIT`` items, beyond that over the union of each query's exact top
  ``rerank_pool``) and ranks by the re-ranked distance, same tie order.
* **Approximate search** (``backend="faiss"``): a faiss inverted-file index (``IndexIVFFlat``, or
  ``IndexIVFScalarQuantizer`` with 8-bit codes for large galleries) built by :meth:`build_ann`,
  which measures its recall@k against exact search on sampled queries and raises ``nprobe`` until
  a target recall is met. Its distances are faiss's squared L2 (same scale, float rounding of
  faiss) and ties are not ordered.

On disk (:meth:`save` / :meth:`load`): ``index.safetensors`` (``features``, optional ``ids`` and
``camids``) and its JSON sidecar ``index.json`` (paths, root, the encoder's fingerprint and
description, the images that could not be read). An index is only ever searched with features
from the encoder that built it: a predictor with another fingerprint is refused.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from reid_pipeline.evaluation.distance import as_feature_tensor, normalize
from reid_pipeline.evaluation.rerank import re_ranking
from reid_pipeline.storage import CheckpointError, load_tensors, save_tensors

from .predictor import EncoderMismatchError, ImageInput, ReIDPredictor

__all__ = [
    "INDEX_FILE",
    "INDEX_FORMAT",
    "EmptyIndexError",
    "FeatureDimensionError",
    "SearchResult",
    "GalleryIndex",
]

INDEX_FILE = "index.safetensors"
INDEX_FORMAT = "reid_pipeline.gallery_index"
INDEX_VERSION = 1
RERANK_FULL_LIMIT = 20_000
_IDX_BITS = 31
_NORM_TOL = 1e-5
# Gallery chunks are a multiple of this many rows, so that all but the last go through the GEMM's
# full-width kernels, as in one big matrix (a 7-row chunk would take BLAS's edge path everywhere).
_CHUNK_ALIGN = 64


class EmptyIndexError(ValueError):
    """A search against an index that holds no gallery items."""


class FeatureDimensionError(ValueError):
    """Features whose dimension is not the index's."""


@dataclass
class SearchResult:
    """Top-k of one query: gallery ``indices``, ``paths``, ``distances`` (ascending) and ``ids``/``camids``."""

    query: str
    indices: list[int]
    paths: list[str]
    distances: list[float]
    ids: list[int] | None
    camids: list[int] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "results": [
                {"rank": r + 1, "index": i, "path": p, "distance": d,
                 "id": self.ids[r] if self.ids is not None else None,
                 "camid": self.camids[r] if self.camids is not None else None}
                for r, (i, p, d) in enumerate(zip(self.indices, self.paths, self.distances))
            ],
        }


# ---------------------------------------------------------------------------------------------
# (distance, index) keys


def _order_key(v: torch.Tensor) -> torch.Tensor:
    """float32 → int64 in [0, 2**32) ordering exactly like the floats (-0.0 == +0.0)."""
    bits = (v.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _decode(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    bits = (key >> _IDX_BITS) - (1 << 31)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return bits.to(torch.int32).view(torch.float32), key & ((1 << _IDX_BITS) - 1)


def _merge_topk(best: torch.Tensor | None, keys: torch.Tensor, k: int) -> torch.Tensor:
    kk = min(k, keys.shape[1])
    top = torch.topk(keys, kk, dim=1, largest=False, sorted=False).values
    if best is None:
        return top
    both = torch.cat([best, top], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1, largest=False, sorted=False).values


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` if its rows are already unit-norm (kept bit for bit), else ``normalize(x)``."""
    if x.numel() == 0:
        return x
    norms = torch.linalg.vector_norm(x.double(), dim=1)
    if bool(((norms - 1.0).abs() <= _NORM_TOL).all()):
        return x
    return normalize(x)


def _labels(values: Any, n: int, name: str) -> np.ndarray | None:
    if values is None:
        return None
    arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
    if arr.ndim != 1 or arr.size != n or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integers (one per image), got {arr.dtype} of shape {arr.shape}")
    return arr.astype(np.int64)


class GalleryIndex:
    """See the module docstring. Build with :meth:`build`, :meth:`from_features` or :meth:`load`."""

    def __init__(
        self,
        feature_dim: int,
        fingerprint: str,
        *,
        encoder: dict | None = None,
        root: str | os.PathLike | None = None,
        with_ids: bool | None = None,
        predictor: ReIDPredictor | None = None,
    ) -> None:
        if int(feature_dim) < 1:
            raise ValueError(f"feature_dim must be >= 1, got {feature_dim}")
        self.feature_dim = int(feature_dim)
        self.fingerprint = str(fingerprint)
        self.encoder = dict(encoder or {})
        self.root = str(root) if root is not None else None
        self.features = torch.zeros(0, self.feature_dim)
        self.paths: list[str] = []
        self.ids: np.ndarray | None = None
        self.camids: np.ndarray | None = None
        self._with_ids = with_ids
        self.skipped: list[dict[str, Any]] = []
        self.predictor = predictor
        self._g_sq: torch.Tensor | None = None
        self._ann: Any = None
        self.ann_report: dict[str, Any] | None = None
        self.ann_config: dict[str, Any] | None = None
        if predictor is not None:
            self._check_predictor(predictor)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_predictor(cls, predictor: ReIDPredictor, root: str | os.PathLike | None = None) -> "GalleryIndex":
        """An empty index for ``predictor``'s features."""
        return cls(predictor.feature_dim, predictor.fingerprint, encoder=predictor.describe(), root=root,
                   predictor=predictor)

    @classmethod
    def build(
        cls,
        predictor: ReIDPredictor,
        images: Iterable[ImageInput],
        ids: Any = None,
        camids: Any = None,
        *,
        root: str | os.PathLike | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> "GalleryIndex":
        """Extract ``images`` with ``predictor`` and index them (unreadable images in :attr:`skipped`)."""
        index = cls.for_predictor(predictor, root=root)
        index.add(predictor, images, ids, camids, progress=progress)
        return index

    @classmethod
    def from_features(
        cls,
        features: Any,
        paths: Sequence[str] | None = None,
        ids: Any = None,
        camids: Any = None,
        *,
        fingerprint: str,
        encoder: dict | None = None,
        root: str | os.PathLike | None = None,
    ) -> "GalleryIndex":
        """An index over features computed elsewhere (normalised here unless already unit-norm)."""
        feats = as_feature_tensor(features, "gallery features")
        index = cls(feats.shape[1], fingerprint, encoder=encoder, root=root)
        index.add_features(feats, paths, ids, camids)
        return index

    def _check_predictor(self, predictor: ReIDPredictor) -> None:
        if predictor.fingerprint != self.fingerprint:
            built = self.encoder.get("source") or "another encoder"
            raise EncoderMismatchError(
                f"this gallery index was built by encoder {self.fingerprint[:12]}… ({built}); the predictor's encoder "
                f"is {predictor.fingerprint[:12]}… ({predictor.source}) — rebuild the index with this encoder "
                "(reid-search index) or load the encoder that built it"
            )
        if predictor.feature_dim != self.feature_dim:
            raise FeatureDimensionError(
                f"predictor gives {predictor.feature_dim}-d features, the index holds {self.feature_dim}-d ones"
            )

    def attach(self, predictor: ReIDPredictor) -> "GalleryIndex":
        """Use ``predictor`` for image queries (refused unless it is the encoder that built the index)."""
        self._check_predictor(predictor)
        self.predictor = predictor
        return self

    def add(
        self,
        predictor: ReIDPredictor | None,
        images: Iterable[ImageInput],
        ids: Any = None,
        camids: Any = None,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Extract and append ``images``; returns the unreadable ones (also appended to :attr:`skipped`).

        ``predictor`` may be ``None`` when one is attached. Camera ids double as the SIE input of
        an encoder trained with camera embeddings.
        """
        predictor = predictor or self.predictor
        if predictor is None:
            raise ValueError("GalleryIndex.add needs a predictor (or attach() one first)")
        self._check_predictor(predictor)
        items = list(images)
        n = len(items)
        id_arr, cam_arr = _labels(ids, n, "ids"), _labels(camids, n, "camids")
        sie_cams = cam_arr if predictor.num_cameras else None
        result = predictor.extract_report(items, camids=sie_cams, progress=progress)
        keep = np.asarray(result.indices, dtype=np.int64)
        self.add_features(
            result.features, self._store_paths(result.names),
            id_arr[keep] if id_arr is not None else None, cam_arr[keep] if cam_arr is not None else None,
        )
        skipped = [f.to_dict() for f in result.failures]
        self.skipped.extend(skipped)
        return skipped

    def _store_paths(self, names: Sequence[str]) -> list[str]:
        """Paths under :attr:`root` are stored relative to it (posix), others as given."""
        if self.root is None:
            return list(names)
        root = Path(self.root).resolve()
        out = []
        for name in names:
            try:
                out.append(Path(name).resolve().relative_to(root).as_posix())
            except (ValueError, OSError):
                out.append(str(name))
        return out

    def add_features(self, features: Any, paths: Sequence[str] | None = None, ids: Any = None, camids: Any = None) -> None:
        """Append features ``(n, D)`` (normalised unless already unit-norm) with their paths and labels."""
        feats = as_feature_tensor(features, "gallery features").to("cpu", torch.float32)
        n = feats.shape[0]
        if feats.shape[1] != self.feature_dim:
            raise FeatureDimensionError(f"features are {feats.shape[1]}-d, this index holds {self.feature_dim}-d features")
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("gallery features contain NaN or inf")
        paths = [f"<item {len(self.paths) + i}>" for i in range(n)] if paths is None else [str(p) for p in paths]
        if len(paths) != n:
            raise ValueError(f"{len(paths)} paths for {n} feature rows")
        id_arr, cam_arr = _labels(ids, n, "ids"), _labels(camids, n, "camids")
        has = id_arr is not None
        if n and self._with_ids is not None and has != self._with_ids:
            state = "has" if self._with_ids else "has no"
            raise ValueError(f"this index {state} ids: add items {'with' if self._with_ids else 'without'} ids")
        if n and (cam_arr is not None) != (self.camids is not None) and len(self.paths):
            raise ValueError("camids must be given for all items of an index or for none")
        if n and self._with_ids is None:
            self._with_ids = has
        if n:
            self.features = torch.cat([self.features, _unit_rows(feats).contiguous()]) if len(self.paths) else _unit_rows(feats).contiguous()
            self.paths.extend(paths)
            if id_arr is not None:
                self.ids = id_arr if self.ids is None else np.concatenate([self.ids, id_arr])
            if cam_arr is not None:
                self.camids = cam_arr if self.camids is None else np.concatenate([self.camids, cam_arr])
            self._g_sq = None
            self._ann = None
            self.ann_report = None

    def __len__(self) -> int:
        return len(self.paths)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
        """Write ``index.safetensors`` + ``index.json`` into ``directory`` (atomically); returns the folder."""
        directory = Path(directory)
        tensors = {"features": self.features}
        if self.ids is not None:
            tensors["ids"] = torch.from_numpy(self.ids)
        if self.camids is not None:
            tensors["camids"] = torch.from_numpy(self.camids)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "count": len(self),
            "feature_dim": self.feature_dim,
            "fingerprint": self.fingerprint,
            "encoder": self.encoder,
            "root": self.root,
            "paths": self.paths,
            "skipped": self.skipped,
            "ann": {k: v for k, v in (self.ann_report or {}).items() if k in ("kind", "nlist", "nprobe", "seed")} or None,
            **(extra or {}),
        }
        save_tensors(directory / INDEX_FILE, tensors, meta)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        predictor: ReIDPredictor | None = None,
        *,
        expected_fingerprint: str | None = None,
    ) -> "GalleryIndex":
        """Read an index written by :meth:`save`; refused if ``predictor``/``expected_fingerprint`` differ."""
        directory = Path(directory)
        path = directory / INDEX_FILE if directory.is_dir() or directory.suffix != ".safetensors" else directory
        if not path.is_file():
            raise CheckpointError(f"{directory}: no gallery index here (expected {INDEX_FILE} and index.json)")
        tensors, meta = load_tensors(path)
        if meta.get("format") != INDEX_FORMAT:
            raise CheckpointError(f"{path}: not a reid_pipeline gallery index (format {meta.get('format')!r})")
        if int(meta.get("version", -1)) != INDEX_VERSION:
            raise CheckpointError(f"{path}: index format version {meta.get('version')}, this code reads {INDEX_VERSION}")
        if not meta.get("complete", True):
            raise CheckpointError(f"{path}: the index build was interrupted; rerun `reid-search index` to finish it")
        feats = tensors.get("features")
        paths = meta.get("paths")
        if feats is None or paths is None or feats.shape[0] != len(paths):
            raise CheckpointError(f"{path}: features and paths disagree ({None if feats is None else feats.shape[0]} vs "
                                  f"{None if paths is None else len(paths)})")
        if expected_fingerprint is not None and meta["fingerprint"] != expected_fingerprint:
            raise EncoderMismatchError(
                f"{path}: index built by encoder {meta['fingerprint'][:12]}…, expected {expected_fingerprint[:12]}…"
            )
        index = cls(int(meta["feature_dim"]), meta["fingerprint"], encoder=meta.get("encoder"), root=meta.get("root"),
                    with_ids="ids" in tensors if len(paths) else None)
        index.features = feats.float().contiguous()
        index.paths = list(paths)
        index.ids = tensors["ids"].numpy() if "ids" in tensors else None
        index.camids = tensors["camids"].numpy() if "camids" in tensors else None
        index.skipped = list(meta.get("skipped") or [])
        index.ann_config = meta.get("ann")
        if predictor is not None:
            index.attach(predictor)
        return index

    def resolve(self, path: str) -> Path:
        """A stored path as a filesystem path (joined to :attr:`root` when relative)."""
        p = Path(path)
        return p if self.root is None or p.is_absolute() else Path(self.root) / p

    # ------------------------------------------------------------------ search

    def _query_features(self, queries: Any, camids: Any) -> tuple[torch.Tensor, list[str]]:
        if isinstance(queries, (torch.Tensor, np.ndarray)) and queries.ndim == 2 and (
            isinstance(queries, np.ndarray) and np.issubdtype(queries.dtype, np.floating)
            or isinstance(queries, torch.Tensor) and queries.is_floating_point()
        ):
            q = as_feature_tensor(queries, "query features").to("cpu", torch.float32)
            if q.shape[1] != self.feature_dim:
                raise FeatureDimensionError(
                    f"query features are {q.shape[1]}-d, this index holds {self.feature_dim}-d features "
                    f"(encoder {self.fingerprint[:12]}…)"
                )
            if not bool(torch.isfinite(q).all()):
                raise ValueError("query features contain NaN or inf")
            return _unit_rows(q), [f"<query {i}>" for i in range(q.shape[0])]
        if self.predictor is None:
            raise ValueError("image queries need the encoder: GalleryIndex.load(dir, predictor) or index.attach(predictor)")
        items = list(queries) if not isinstance(queries, (str, os.PathLike)) else [queries]
        result = self.predictor.extract_report(items, camids=camids if self.predictor.num_cameras else None)
        if result.failures:
            from .predictor import UnreadableImagesError

            raise UnreadableImagesError(result.failures, len(items))
        return result.features, result.names

    def _gallery_sq(self) -> torch.Tensor:
        if self._g_sq is None:
            self._g_sq = (self.features * self.features).sum(dim=1)
        return self._g_sq

    def _exact_keys(self, q: torch.Tensor, k: int, chunk_size: int | None) -> torch.Tensor:
        """(Q, k) sorted (distance, index) keys of the exact top-k, chunked over gallery and queries."""
        g = self.features
        g_sq = self._gallery_sq()
        n = g.shape[0]
        if n >= 1 << _IDX_BITS:
            raise ValueError(f"exact search supports fewer than {1 << _IDX_BITS} gallery items, got {n}")
        out = []
        q_block = 1024
        for qs in range(0, q.shape[0], q_block):
            qc = q[qs : qs + q_block]
            q_sq = (qc * qc).sum(dim=1, keepdim=True)
            step = int(chunk_size or max(4096, (1 << 24) // max(1, qc.shape[0])))
            step = -(-step // _CHUNK_ALIGN) * _CHUNK_ALIGN  # see _CHUNK_ALIGN
            best = None
            for s in range(0, n, step):
                gc = g[s : s + step]
                d = torch.addmm(q_sq + g_sq[s : s + step].unsqueeze(0), qc, gc.t(), beta=1.0, alpha=-2.0)
                keys = (_order_key(d) << _IDX_BITS) | torch.arange(s, s + gc.shape[0], dtype=torch.int64)
                best = _merge_topk(best, keys, k)
            out.append(torch.sort(best, dim=1).values)
        return torch.cat(out)

    def _rerank_keys(self, q: torch.Tensor, k: int, pool: int | None, k1: int, k2: int, lam: float,
                     device: str | None) -> torch.Tensor:
        n = len(self)
        if pool is None and n <= RERANK_FULL_LIMIT:
            cols = None
            gallery = self.features
        else:
            pool = int(pool or 1000)
            cand = self._exact_keys(q, max(k, pool), None)
            cols = torch.unique(_decode(cand)[1])  # sorted ascending: keeps the gallery order
            gallery = self.features[cols]
        dist = torch.from_numpy(re_ranking(q, gallery, k1=k1, k2=k2, lambda_value=lam, device=device,
                                           normalize_features=False))
        local = torch.arange(dist.shape[1], dtype=torch.int64)
        keys = (_order_key(dist) << _IDX_BITS) | local
        best = torch.sort(_merge_topk(None, keys, k), dim=1).values
        if cols is None:
            return best
        vals, loc = _decode(best)
        return (_order_key(vals) << _IDX_BITS) | cols[loc]

    def search(
        self,
        queries: Any,
        k: int = 10,
        rerank: bool = False,
        *,
        backend: str = "exact",
        camids: Any = None,
        chunk_size: int | None = None,
        rerank_pool: int | None = None,
        k1: int = 50,
        k2: int = 15,
        lambda_value: float = 0.3,
        device: str | None = None,
    ) -> list[SearchResult]:
        """Top-``k`` gallery items for each query (ascending distance; ties by gallery index).

        ``queries``: a float ``(Q, D)`` feature matrix, or images (paths, PIL, arrays, tensors)
        extracted with the attached predictor. ``k`` is clamped to the gallery size. ``backend``:
        ``"exact"`` or ``"faiss"`` (after :meth:`build_ann`; not with ``rerank``). Re-ranking:
        ``k1``, ``k2``, ``lambda_value`` as in the evaluation, over the whole gallery up to
        ``RERANK_FULL_LIMIT`` items or the union of each query's exact top ``rerank_pool``.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if backend not in ("exact", "faiss"):
            raise ValueError(f"backend must be 'exact' or 'faiss', got {backend!r}")
        if len(self) == 0:
            raise EmptyIndexError("the gallery index is empty: add images (GalleryIndex.add / reid-search index) first")
        q, names = self._query_features(queries, camids)
        if q.shape[0] == 0:
            return []
        k = int(min(k, len(self)))
        if rerank:
            if backend != "exact":
                raise ValueError("re-ranking runs on exact distances: use backend='exact' with rerank=True")
            keys = self._rerank_keys(q, k, rerank_pool, k1, k2, lambda_value, device)
            vals, idx = _decode(keys)
        elif backend == "faiss":
            vals, idx = self._faiss_search(q, k)
        else:
            vals, idx = _decode(self._exact_keys(q, k, chunk_size))
        return [self._result(name, idx[r], vals[r]) for r, name in enumerate(names)]

    def _result(self, name: str, idx: torch.Tensor, vals: torch.Tensor) -> SearchResult:
        keep = idx >= 0
        ii = idx[keep].tolist()
        return SearchResult(
            query=name,
            indices=ii,
            paths=[self.paths[i] for i in ii],
            distances=[float(v) for v in vals[keep].tolist()],
            ids=[int(self.ids[i]) for i in ii] if self.ids is not None else None,
            camids=[int(self.camids[i]) for i in ii] if self.camids is not None else None,
        )

    def distances(self, queries: Any) -> torch.Tensor:
        """The full ``(Q, G)`` exact distance matrix (small galleries; what ``evaluate_rank`` takes)."""
        q, _ = self._query_features(queries, None)
        g_sq = self._gallery_sq()
        q_sq = (q * q).sum(dim=1, keepdim=True)
        return torch.addmm(q_sq + g_sq.unsqueeze(0), q, self.features.t(), beta=1.0, alpha=-2.0)

    # ------------------------------------------------------------------ approximate (faiss)

    def build_ann(
        self,
        *,
        kind: str = "ivf_flat",
        nlist: int | None = None,
        nprobe: int | None = None,
        target_recall: float = 0.95,
        k: int = 10,
        sample_queries: int = 200,
        queries: Any = None,
        train_size: int | None = None,
        niter: int = 10,
        seed: int = 1234,
        num_threads: int | None = None,
    ) -> dict[str, Any]:
        """Build the faiss inverted-file index and report its recall@k against exact search.

        ``kind``: ``"ivf_flat"`` (full float32 vectors) or ``"ivf_sq8"`` (8-bit scalar-quantised,
        a quarter of the memory). ``nlist`` (default ``4·√N``, at most ``N/39``) cells are trained
        by k-means on ``train_size`` sampled vectors (default ``64·nlist``). Recall is measured on
        ``queries`` (features; default: ``sample_queries`` gallery items, seeded, with a little
        noise so that they are not their own nearest neighbour). With ``nprobe=None``, ``nprobe`` is
        doubled from 1 until recall@k reaches ``target_recall`` (or all cells are probed).
        Returns ``{kind, nlist, nprobe, recall_at_k, k, build_s, train_size, curve: [(nprobe, recall, ms/query)]}``.
        """
        import faiss

        if kind not in ("ivf_flat", "ivf_sq8"):
            raise ValueError(f"kind must be 'ivf_flat' or 'ivf_sq8', got {kind!r}")
        n = len(self)
        if n == 0:
            raise EmptyIndexError("cannot build an approximate index over an empty gallery")
        if num_threads is not None:
            faiss.omp_set_num_threads(int(num_threads))
        d = self.feature_dim
        nlist = int(nlist or max(1, min(int(4 * math.sqrt(n)), n // 39 or 1)))
        if not 1 <= nlist <= n:
            raise ValueError(f"nlist must be in [1, {n}], got {nlist}")
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        xb = self.features.numpy()
        train_n = int(min(n, train_size or 64 * nlist))
        train = xb[np.sort(rng.choice(n, train_n, replace=False))] if train_n < n else xb
        quantizer = faiss.IndexFlatL2(d)
        if kind == "ivf_flat":
            ann = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        else:
            ann = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
        ann.cp.niter = int(niter)
        ann.cp.seed = int(seed)
        ann.train(np.ascontiguousarray(train))
        step = 1 << 16
        for s in range(0, n, step):
            ann.add(np.ascontiguousarray(xb[s : s + step]))
        build_s = time.perf_counter() - t0

        if queries is None:
            m = min(int(sample_queries), n)
            pick = np.sort(rng.choice(n, m, replace=False))
            noise = torch.from_numpy(rng.standard_normal((m, d)).astype(np.float32)) * (0.05 / math.sqrt(d))
            qf = normalize(self.features[pick] + noise)
        else:
            qf = _unit_rows(as_feature_tensor(queries, "queries").float())
        kk = int(min(k, n))
        exact = _decode(self._exact_keys(qf, kk, None))[1].numpy()
        qn = np.ascontiguousarray(qf.numpy())

        def recall_at(probe: int) -> tuple[float, float]:
            ann.nprobe = int(probe)
            t = time.perf_counter()
            _, got = ann.search(qn, kk)
            ms = (time.perf_counter() - t) * 1000.0 / len(qn)
            hits = sum(len(set(exact[i].tolist()) & set(got[i].tolist())) for i in range(len(qn)))
            return hits / float(exact.size), ms

        curve = []
        if nprobe is not None:
            rec, ms = recall_at(int(nprobe))
            curve.append((int(nprobe), rec, ms))
        else:
            probe = 1
            while True:
                rec, ms = recall_at(probe)
                curve.append((probe, rec, ms))
                if rec >= target_recall or probe >= nlist:
                    break
                probe = min(nlist, probe * 2)
        chosen, recall, ms = curve[-1]
        ann.nprobe = int(chosen)
        self._ann = ann
        self._ann_quantizer = quantizer  # the IVF index points at it: keep it alive
        self.ann_report = {
            "kind": kind, "nlist": nlist, "nprobe": int(chosen), "recall_at_k": float(recall), "k": kk,
            "ms_per_query": float(ms), "build_s": float(build_s), "train_size": int(train_n), "seed": int(seed),
            "num_queries": int(len(qn)), "curve": [[p, float(r), float(t)] for p, r, t in curve],
        }
        return dict(self.ann_report)

    def _faiss_search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._ann is None:
            raise ValueError("no approximate index yet: call index.build_ann() before search(backend='faiss')")
        dist, idx = self._ann.search(np.ascontiguousarray(q.numpy()), k)
        return torch.from_numpy(dist), torch.from_numpy(idx.astype(np.int64))
