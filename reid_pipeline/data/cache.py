"""Decode-once image cache: every image is decoded a single time into uint8 CHW pixels.

ReID images are small (Market-1501: 128×64 JPEGs), so decoding them and running per-sample PIL
transforms costs more than the forward pass of a GPU. :class:`ImageCache` decodes each image once
(PIL → RGB → uint8, at its *stored* size, no resizing) into one flat uint8 buffer, and serves
batches from it; the random augmentations then run batched as tensor ops
(:mod:`reid_pipeline.data.transforms`).

Two modes:

* ``"memory"`` — the buffer is a torch tensor in RAM (or on a GPU after :meth:`ImageCache.to`).
* ``"disk"`` — the buffer is one flat ``.u8`` file plus a JSON index (offsets, shapes, paths,
  fingerprint), read through a numpy memmap. Both files are written atomically and named by the
  fingerprint of the sources (relative paths, sizes, mtimes and an optional caller key), so a cache
  that matches is reused and one that does not is rebuilt beside it.

Images of different stored sizes are allowed. :meth:`ImageCache.batch` stacks a batch when all its
images have the same size and raises :class:`MixedSizeError` otherwise; :meth:`ImageCache.fetch`
returns the stacked tensor when it can and the list of per-image tensors when it cannot — the
transforms accept either and resize a list group by group (each group of equal size in one call).

Bounds: an image whose longer side exceeds ``max_side`` (default :data:`DEFAULT_MAX_SIDE`, 4× the
256-pixel ReID input) is downscaled while it is decoded (JPEG: PIL's DCT-domain ``draft``, then a
reducing resize), so a photo of 8000×8000 pixels costs what a 1024×1024 one does. 16-bit grayscale
PNGs are scaled to 8 bits. Files PIL refuses as decompression bombs raise :class:`ImageDecodeError`
naming the file. The size of a cache (images, bytes) is known from the headers before anything is
decoded: :func:`plan_image_cache`, and ``report=`` of :meth:`ImageCache.from_paths`. The disk cache
is preallocated (``posix_fallocate``) after a free-space check and written with ``pwrite``, never
through a writable memory map, so a full disk raises :class:`~reid_pipeline.storage.StorageFullError`
naming the file (not SIGBUS) and leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from reid_pipeline.storage import (
    StorageFullError,
    check_free_space,
    create_temp_file,
    no_space_error,
    read_json,
    remove_quietly,
    write_json,
)

__all__ = [
    "DEFAULT_MAX_SIDE",
    "CachePlan",
    "ImageCache",
    "ImageDecodeError",
    "MixedSizeError",
    "bounded_size",
    "decode_image",
    "plan_image_cache",
    "sources_fingerprint",
]

CACHE_FORMAT = "reid_pipeline.image_cache"
CACHE_VERSION = 2  # 2: images bounded by max_side at decode time, 16-bit PNGs scaled to 8 bits

#: Longer side, in pixels, above which an image is downscaled as it is decoded (4× a 256×128 input).
DEFAULT_MAX_SIDE = 1024

_log = logging.getLogger(__name__)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageDecodeError(ValueError):
    """An image file exists but cannot be decoded."""


class MixedSizeError(ValueError):
    """A batch was requested from images that do not all have the same stored size."""


def _resolve(root: Path, rel: str | os.PathLike) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else root / p


def _check_max_side(max_side: int | None) -> int | None:
    if max_side is None:
        return None
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}")
    return int(max_side)


def bounded_size(height: int, width: int, max_side: int | None = DEFAULT_MAX_SIDE) -> tuple[int, int]:
    """``(height, width)`` after bounding the longer side to ``max_side`` (aspect ratio kept)."""
    max_side = _check_max_side(max_side)
    longer = max(height, width)
    if max_side is None or longer <= max_side:
        return int(height), int(width)
    scale = max_side / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with 16-bit (and 32-bit integer) grayscale scaled to 8 bits instead of clipped to white."""
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im)
        arr = np.clip(arr, 0, 65535).astype(np.uint32) if arr.dtype != np.uint16 else arr.astype(np.uint32)
        gray = ((arr * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open_error(path: Path, exc: BaseException, what: str) -> ImageDecodeError:
    if isinstance(exc, Image.DecompressionBombError):
        return ImageDecodeError(f"{path}: decompression bomb refused ({exc})")
    return ImageDecodeError(f"{path}: {what} ({exc})")


def decode_image(path: str | os.PathLike, max_side: int | None = DEFAULT_MAX_SIDE) -> torch.Tensor:
    """Decode one image file into a uint8 ``(3, H, W)`` tensor (RGB).

    The stored size, unless its longer side exceeds ``max_side``: then the size is
    :func:`bounded_size` and the image is reduced while it is decoded (``None``: never).
    """
    path = Path(path)
    max_side = _check_max_side(max_side)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w0, h0 = im.size
            th, tw = bounded_size(h0, w0, max_side)
            if (th, tw) != (h0, w0) and im.format == "JPEG":
                im.draft("RGB", (tw, th))  # DCT-domain downscale: decodes at >= the target size
            rgb = _to_rgb(im)
            if rgb.size != (tw, th):
                rgb = rgb.resize((tw, th), Image.Resampling.BILINEAR, reducing_gap=2.0)
            arr = np.asarray(rgb)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc, "cannot decode image") from exc
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header without decoding the pixels."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _open_error(path, exc, "cannot read image header") from exc
    return int(h), int(w)


@dataclass(frozen=True)
class CachePlan:
    """What a cache of some images will hold, known from their headers before any decode.

    ``shapes`` are the decoded ``(3, H, W)`` sizes (after :func:`bounded_size`), ``offsets`` where
    each starts in the flat buffer, ``nbytes`` the buffer's size, ``downscaled`` how many images
    exceed ``max_side`` and are reduced as they are decoded.
    """

    images: int
    nbytes: int
    downscaled: int
    max_side: int | None
    shapes: np.ndarray
    offsets: np.ndarray

    def describe(self) -> dict:
        sizes = {tuple(int(v) for v in s[1:]) for s in self.shapes}
        return {"images": self.images, "bytes": self.nbytes, "downscaled": self.downscaled,
                "max_side": self.max_side, "distinct_sizes": len(sizes)}


def plan_image_cache(
    root: str | os.PathLike,
    rel_paths: Sequence[str | os.PathLike],
    *,
    max_side: int | None = DEFAULT_MAX_SIDE,
    num_threads: int | None = None,
) -> CachePlan:
    """Read the headers of ``root / rel`` (no pixel decode) and size the cache they would make."""
    root = Path(root)
    max_side = _check_max_side(max_side)
    paths = [_resolve(root, r) for r in rel_paths]
    with ThreadPoolExecutor(max_workers=int(num_threads or _default_threads())) as pool:
        hw = list(pool.map(_header_size, paths))
    bounded = [bounded_size(h, w, max_side) for h, w in hw]
    shapes = np.array([(3, h, w) for h, w in bounded], dtype=np.int64).reshape(-1, 3)
    sizes = shapes.prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(paths) else np.zeros(0, np.int64)
    downscaled = sum(1 for a, b in zip(hw, bounded) if a != b)
    return CachePlan(images=len(paths), nbytes=int(sizes.sum()), downscaled=downscaled, max_side=max_side,
                     shapes=shapes, offsets=offsets)


def sources_fingerprint(root: str | os.PathLike, rel_paths: Sequence[str], key: str | None = None,
                        max_side: int | None = DEFAULT_MAX_SIDE) -> str:
    """sha256 over the cache format version, ``key``, ``max_side`` and each path's name, size and mtime."""
    root = Path(root)
    h = hashlib.sha256()
    h.update(f"{CACHE_FORMAT}:{CACHE_VERSION}:{key or ''}:{max_side}\n".encode())
    for rel in rel_paths:
        p = _resolve(root, rel)
        try:
            st = p.stat()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{p}: image file not found (listed as {rel!r})") from exc
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _default_threads() -> int:
    return max(1, min(8, (os.cpu_count() or 1) * 2))


class ImageCache:
    """uint8 CHW images in one flat buffer; see the module docstring.

    Build with :meth:`from_paths` (files) or :meth:`from_tensors` (already decoded images).
    """

    def __init__(
        self,
        storage: torch.Tensor,
        offsets: np.ndarray,
        shapes: np.ndarray,
        *,
        rel_paths: Sequence[str] | None = None,
        fingerprint: str | None = None,
        path: Path | None = None,
    ) -> None:
        if storage.dtype != torch.uint8 or storage.dim() != 1:
            raise ValueError(f"storage must be a 1-D uint8 tensor, got {storage.dtype} with shape {tuple(storage.shape)}")
        offsets = np.asarray(offsets, dtype=np.int64)
        shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 3)
        if len(offsets) != len(shapes):
            raise ValueError(f"{len(offsets)} offsets but {len(shapes)} shapes")
        if len(shapes) and int(offsets[-1] + shapes[-1].prod()) > storage.numel():
            raise ValueError("cache index points past the end of its storage")
        self.storage = storage
        self.offsets = offsets
        self.shapes = shapes
        self.rel_paths = list(rel_paths) if rel_paths is not None else None
        self.fingerprint = fingerprint
        self.path = path
        self._uniform: torch.Tensor | None = None
        if len(shapes) and (shapes == shapes[0]).all():
            c, h, w = (int(v) for v in shapes[0])
            n = len(shapes)
            if int(offsets[0]) == 0 and (np.diff(offsets) == c * h * w).all():
                self._uniform = storage[: n * c * h * w].view(n, c, h, w)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_tensors(cls, images: Iterable[torch.Tensor]) -> "ImageCache":
        """An in-memory cache of already decoded uint8 ``(3, H, W)`` images (copied)."""
        imgs = list(images)
        for i, im in enumerate(imgs):
            if im.dtype != torch.uint8 or im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"image {i}: expected a uint8 (3, H, W) tensor, got {im.dtype} {tuple(im.shape)}")
        shapes = np.array([tuple(im.shape) for im in imgs], dtype=np.int64).reshape(-1, 3)
        sizes = shapes.prod(axis=1)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if len(imgs) else np.zeros(0, np.int64)
        storage = torch.cat([im.reshape(-1).cpu() for im in imgs]) if imgs else torch.zeros(0, dtype=torch.uint8)
        return cls(storage, offsets, shapes)

    @classmethod
    def from_paths(
        cls,
        root: str | os.PathLike,
        rel_paths: Sequence[str | os.PathLike],
        *,
        mode: str = "memory",
        cache_dir: str | os.PathLike | None = None,
        key: str | None = None,
        num_threads: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_side: int | None = DEFAULT_MAX_SIDE,
        report: Callable[[dict], None] | None = None,
    ) -> "ImageCache":
        """Decode ``root / rel`` for every path, once, in a thread pool.

        ``mode="disk"`` needs ``cache_dir``: the cache is written there as
        ``images-<fingerprint[:20]>.u8`` + ``.json`` and reused on later calls whose sources
        (paths, sizes, mtimes, ``key``, ``max_side``) are unchanged. Images whose longer side exceeds
        ``max_side`` are stored downscaled to it (``None``: stored sizes). Before decoding,
        ``report`` receives the plan (``{"images", "bytes", "downscaled", "max_side",
        "distinct_sizes", "mode", "path"}``; also logged at INFO); ``progress(done, total)`` is
        called as images are decoded.

        Raises:
            StorageFullError: the disk cache does not fit on ``cache_dir``'s file system (checked
                before decoding; the message names the file, the bytes needed and free).
            ImageDecodeError: an image cannot be decoded (the message names it).
        """
        if mode not in ("memory", "disk"):
            raise ValueError(f"mode must be 'memory' or 'disk', got {mode!r}")
        max_side = _check_max_side(max_side)
        root = Path(root)
        rels = [str(r) for r in rel_paths]
        if not rels:
            raise ValueError(f"no images given to cache (root {root})")
        threads = int(num_threads or _default_threads())
        fingerprint = sources_fingerprint(root, rels, key, max_side) if mode == "disk" else None
        stem: Path | None = None
        if mode == "disk":
            if cache_dir is None:
                raise ValueError("mode='disk' needs a cache_dir")
            cache_dir = Path(cache_dir)
            cache_dir.mkdir(parents=True, exist_ok=True)
            stem = cache_dir / f"images-{fingerprint[:20]}"
            existing = cls._open_disk(stem, fingerprint)
            if existing is not None:
                return existing

        paths = [_resolve(root, r) for r in rels]
        plan = plan_image_cache(root, rels, max_side=max_side, num_threads=threads)
        summary = {**plan.describe(), "mode": mode, "path": str(stem.with_suffix(".u8")) if stem else None}
        _log.info("image cache: %d images, %d bytes (%d downscaled to max side %s), %s%s", plan.images,
                  plan.nbytes, plan.downscaled, max_side, mode, f" at {summary['path']}" if stem else "")
        if report is not None:
            report(summary)
        shapes, offsets, total = plan.shapes, plan.offsets, plan.nbytes

        if mode == "memory":
            buf = np.empty(total, dtype=np.uint8)

            def into_memory(offset: int, pixels: np.ndarray) -> None:
                buf[offset : offset + pixels.size] = pixels

            cls._decode_into(into_memory, paths, shapes, offsets, threads, progress, max_side)
            return cls(torch.from_numpy(buf), offsets, shapes, rel_paths=rels)

        index = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "root": str(root),
            "count": len(rels),
            "nbytes": total,
            "max_side": max_side,
            "offsets": offsets.tolist(),
            "shapes": shapes.tolist(),
            "rel_paths": rels,
        }
        data_path, index_path = stem.with_suffix(".u8"), stem.with_suffix(".json")
        index_bytes = len(json.dumps(index, indent=2)) + 4096
        check_free_space(data_path, total + index_bytes, what=f"writing the image cache {data_path.name}")
        cls._write_disk(data_path, total, paths, shapes, offsets, threads, progress, max_side)
        try:
            write_json(index_path, index)
        except BaseException:
            remove_quietly(data_path)  # a data file without its index would only hold the space
            raise
        opened = cls._open_disk(stem, fingerprint)
        if opened is None:  # pragma: no cover - would mean the files vanished underneath us
            raise OSError(f"{data_path}: disk cache written but could not be reopened")
        return opened

    @classmethod
    def _write_disk(
        cls,
        data_path: Path,
        total: int,
        paths: Sequence[Path],
        shapes: np.ndarray,
        offsets: np.ndarray,
        threads: int,
        progress: Callable[[int, int], None] | None,
        max_side: int | None,
    ) -> None:
        """Decode into a preallocated temporary file with ``pwrite``, then move it to ``data_path``."""
        fd, tmp = create_temp_file(data_path, suffix=".u8.tmp")
        try:
            try:
                if total and hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, total)
                else:
                    os.ftruncate(fd, total)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(fd, total)  # the file system cannot reserve space; pwrite still reports ENOSPC

            def into_file(offset: int, pixels: np.ndarray) -> None:
                view = memoryview(pixels).cast("B")
                while len(view):
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written

            cls._decode_into(into_file, paths, shapes, offsets, threads, progress, max_side)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, data_path)
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            remove_quietly(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(exc, StorageFullError):
                raise no_space_error(data_path, total, code=exc.errno, what="writing the image cache") from exc
            raise
        except BaseException:
            if fd >= 0:
                os.close(fd)
            remove_quietly(tmp)
            raise

    @staticmethod
    def _decode_into(
        sink: Callable[[int, np.ndarray], None],
        paths: Sequence[Path],
        shapes: np.ndarray,
        offsets: np.ndarray,
        threads: int,
        progress: Callable[[int, int], None] | None,
        max_side: int | None,
    ) -> None:
        def work(i: int) -> int:
            img = decode_image(paths[i], max_side)
            if tuple(img.shape) != tuple(int(v) for v in shapes[i]):
                raise ImageDecodeError(
                    f"{paths[i]}: decoded to {tuple(img.shape)} but its header says {tuple(int(v) for v in shapes[i])}"
                )
            sink(int(offsets[i]), img.numpy().reshape(-1))
            return i

        n = len(paths)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for done, _ in enumerate(pool.map(work, range(n)), start=1):
                if progress is not None and (done % 256 == 0 or done == n):
                    progress(done, n)

    @classmethod
    def _open_disk(cls, stem: Path, fingerprint: str) -> "ImageCache | None":
        data, index_path = stem.with_suffix(".u8"), stem.with_suffix(".json")
        if not (data.is_file() and index_path.is_file()):
            return None
        try:
            index = read_json(index_path)
        except Exception:  # noqa: BLE001 - an unreadable index just means "rebuild"
            return None
        if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
            return None
        if index.get("fingerprint") != fingerprint or data.stat().st_size != int(index.get("nbytes", -1)):
            return None
        nbytes = int(index["nbytes"])
        # copy-on-write: writable for torch.from_numpy, never written back to the file.
        mm = np.memmap(data, dtype=np.uint8, mode="c", shape=(nbytes,)) if nbytes else np.zeros(0, np.uint8)
        return cls(
            torch.from_numpy(mm),
            np.asarray(index["offsets"], dtype=np.int64),
            np.asarray(index["shapes"], dtype=np.int64),
            rel_paths=index.get("rel_paths"),
            fingerprint=fingerprint,
            path=data,
        )

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def device(self) -> torch.device:
        return self.storage.device

    @property
    def nbytes(self) -> int:
        return int(self.storage.numel())

    @property
    def uniform_shape(self) -> tuple[int, int, int] | None:
        """``(3, H, W)`` when every image has the same stored size, else ``None``."""
        return tuple(self._uniform.shape[1:]) if self._uniform is not None else None

    def _check(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        n = len(self)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            bad = idx[(idx < 0) | (idx >= n)][0].item()
            raise IndexError(f"image index {bad} out of range for a cache of {n} images")
        return idx

    def get(self, indices: Sequence[int] | torch.Tensor) -> list[torch.Tensor]:
        """The images at ``indices`` as uint8 ``(3, H, W)`` tensors (views on the cache's device)."""
        out = []
        for i in self._check(indices).tolist():
            c, h, w = (int(v) for v in self.shapes[i])
            o = int(self.offsets[i])
            out.append(self.storage[o : o + c * h * w].view(c, h, w))
        return out

    def batch(self, indices: Sequence[int] | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
        """A uint8 ``(B, 3, H, W)`` batch on ``device``; raises :class:`MixedSizeError` if sizes differ."""
        idx = self._check(indices)
        if self._uniform is not None:
            out = self._uniform[idx.to(self.storage.device)]
        else:
            imgs = self.get(idx)
            sizes = {tuple(im.shape) for im in imgs}
            if len(sizes) > 1:
                raise MixedSizeError(
                    f"batch of {len(imgs)} images has {len(sizes)} different stored sizes {sorted(sizes)[:4]}; "
                    "use ImageCache.fetch()/get() and let the transform resize them"
                )
            out = torch.stack(imgs) if imgs else torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return out.to(device) if device is not None else out

    def fetch(
        self, indices: Sequence[int] | torch.Tensor, device: str | torch.device | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        """Like :meth:`batch` when all sizes agree, else the list of images moved to ``device``."""
        try:
            return self.batch(indices, device)
        except MixedSizeError:
            imgs = self.get(indices)
            return [im.to(device) for im in imgs] if device is not None else imgs

    def to(self, device: str | torch.device) -> "ImageCache":
        """A cache whose buffer lives on ``device`` (e.g. the whole train set in GPU memory)."""
        dev = torch.device(device)
        if dev == self.storage.device:
            return self
        return ImageCache(
            self.storage.to(dev), self.offsets, self.shapes, rel_paths=self.rel_paths, fingerprint=self.fingerprint
        )

    def describe(self) -> dict:
        """Small JSON-able summary for logs and metadata."""
        sizes = {tuple(int(v) for v in s[1:]) for s in self.shapes}
        return {
            "images": len(self),
            "bytes": self.nbytes,
            "distinct_sizes": len(sizes),
            "size": list(next(iter(sizes))) if len(sizes) == 1 else None,
            "device": str(self.device),
            "path": str(self.path) if self.path else None,
        }

    def __repr__(self) -> str:
        return f"ImageCache({json.dumps(self.describe())})"
