"""Building a gallery index over a (large) image folder, resumably.

:func:`build_gallery_index` extracts the images in shards of ``shard_size``; each finished shard is
saved (safetensors + JSON, atomically) under ``<out>/shards/`` before the next one starts. A run that
is interrupted — killed, out of memory, the machine rebooted — picks up at the first missing shard
when it is started again with the same encoder and the same image list, then merges the shards into
``<out>/index.safetensors`` + ``index.json`` and removes them. Unreadable images are named in the
log and kept in the index's ``skipped`` list.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from reid_pipeline.data.validation import is_image_name
from reid_pipeline.storage import CheckpointError, load_tensors, read_json, save_tensors

from .index import INDEX_FILE, GalleryIndex, _labels
from .predictor import EncoderMismatchError, ImageInput, ReIDPredictor

__all__ = ["list_images", "parse_market_name", "labels_from_names", "build_gallery_index"]

SHARD_DIR = "shards"
_MARKET_NAME = re.compile(r"^(-1|\d+)_c(\d+)")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``) under ``folder``, recursively, sorted;
    hidden files and folders are left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_name(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def parse_market_name(name: str | os.PathLike) -> tuple[int, int] | None:
    """``(pid, camid)`` of a Market-1501-style file name (``0002_c1s1_000451_03.jpg`` → ``(2, 0)``),
    cameras 0-based; ``None`` when the name does not follow the convention."""
    m = _MARKET_NAME.match(Path(name).name)
    if m is None or int(m.group(2)) < 1:
        return None
    return int(m.group(1)), int(m.group(2)) - 1


def labels_from_names(names: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray] | None:
    """pids and camids of every name when *all* parse as Market-style, else ``None``."""
    parsed = [parse_market_name(n) for n in names]
    if not parsed or any(p is None for p in parsed):
        return None
    arr = np.asarray(parsed, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def _list_fingerprint(names: Sequence[str], ids: np.ndarray | None, camids: np.ndarray | None, shard_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"shard_size": shard_size, "n": len(names)}).encode())
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    for arr in (ids, camids):
        h.update(b"-" if arr is None else arr.astype(np.int64).tobytes())
    return h.hexdigest()


def build_gallery_index(
    predictor: ReIDPredictor,
    images: Sequence[ImageInput],
    out_dir: str | os.PathLike,
    *,
    ids: Any = None,
    camids: Any = None,
    root: str | os.PathLike | None = None,
    shard_size: int = 2048,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> GalleryIndex:
    """Extract ``images`` with ``predictor`` into a gallery index saved at ``out_dir``; resumable.

    ``root``: paths under it are stored relative to it (the index stays valid when the folder is
    moved with it). ``progress(done, total)`` counts images (resumed shards included). An existing
    complete index for the same encoder and image list is returned as is; one built by another
    encoder is refused with :class:`EncoderMismatchError` unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    items = list(images)
    n = len(items)
    if n == 0:
        raise ValueError(f"no images to index into {out_dir}")
    names = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<image {i}>" for i, x in enumerate(items)]
    id_arr, cam_arr = _labels(ids, n, "ids"), _labels(camids, n, "camids")
    list_fp = _list_fingerprint(names, id_arr, cam_arr, int(shard_size))
    say = log or (lambda _msg: None)

    final = out_dir / INDEX_FILE
    if final.is_file():
        meta = read_json(final.with_suffix(".json"))
        if meta.get("fingerprint") != predictor.fingerprint and not overwrite:
            raise EncoderMismatchError(
                f"{out_dir}: holds an index built by encoder {str(meta.get('fingerprint'))[:12]}…, not by "
                f"{predictor.fingerprint[:12]}… ({predictor.source}); choose another --out or pass overwrite"
            )
        if meta.get("fingerprint") == predictor.fingerprint and meta.get("list_fingerprint") == list_fp:
            say(f"{out_dir}: index already complete ({meta.get('count')} images)")
            if progress is not None:
                progress(n, n)
            return GalleryIndex.load(out_dir, predictor)
    shard_dir = out_dir / SHARD_DIR
    if overwrite and shard_dir.is_dir():
        shutil.rmtree(shard_dir)

    index = GalleryIndex.for_predictor(predictor, root=root)
    sie = predictor.num_cameras > 0
    num_shards = (n + shard_size - 1) // shard_size
    for s in range(num_shards):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        shard = shard_dir / f"shard-{s:05d}.safetensors"
        tensors = meta = None
        if shard.is_file():
            try:
                tensors, meta = load_tensors(shard)
            except CheckpointError:
                tensors = meta = None
            if meta is None or meta.get("fingerprint") != predictor.fingerprint or meta.get("list_fingerprint") != list_fp:
                tensors = meta = None
        if meta is None:
            def shard_progress(done: int, _total: int, lo: int = lo) -> None:
                if progress is not None:
                    progress(lo + done, n)

            result = predictor.extract_report(items[lo:hi], camids=cam_arr[lo:hi] if sie and cam_arr is not None else None,
                                              progress=shard_progress)
            keep = np.asarray(result.indices, dtype=np.int64) + lo
            failures = [{"index": f.index + lo, "name": names[f.index + lo], "reason": f.reason} for f in result.failures]
            for f in failures:
                say(f"skipped unreadable image {f['name']}: {f['reason']}")
            tensors = {"features": result.features, "rows": torch.from_numpy(keep)}
            meta = {"fingerprint": predictor.fingerprint, "list_fingerprint": list_fp, "range": [lo, hi], "failures": failures}
            save_tensors(shard, tensors, meta)
        else:
            say(f"resumed shard {s + 1}/{num_shards} from {shard}")
            if progress is not None:
                progress(hi, n)
        rows = tensors["rows"].numpy()
        index.add_features(tensors["features"], index._store_paths([names[i] for i in rows]),
                           id_arr[rows] if id_arr is not None else None, cam_arr[rows] if cam_arr is not None else None)
        index.skipped.extend(meta["failures"])
    if len(index) == 0:
        raise ValueError(f"none of the {n} images could be read (first: {index.skipped[0]['name']}: {index.skipped[0]['reason']})")
    index.save(out_dir, extra={"complete": True, "list_fingerprint": list_fp, "images_listed": n})
    shutil.rmtree(shard_dir, ignore_errors=True)
    say(f"indexed {len(index)} of {n} images into {out_dir}" + (f" ({len(index.skipped)} unreadable)" if index.skipped else ""))
    return index
