"""Cheap integrity checks for image files.

A full decode of ~32k Market-1501 crops costs tens of seconds; the checks here read only the first
and last bytes of each file, which is enough to catch the common failures of a dataset copied by
hand: empty files, truncated downloads (a JPEG without its End-Of-Image marker, a PNG without its
``IEND`` chunk, a BMP shorter than its header says), files that are not images at all, and files
that vanish between listing and reading. Optionally PIL parses the header (no pixel decode) to
confirm the image has a positive size.

Nothing here imports dagster or torch.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Iterable, Sequence

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "is_image_name",
    "check_image_file",
    "find_bad_images",
]

#: File-name suffixes (lower case) treated as images by every layout.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp"})

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND"
_HEAD_BYTES = 32
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "a GIF image, which is not supported"),
    (b"GIF89a", "a GIF image, which is not supported"),
    (b"II*\x00", "a TIFF image, which is not supported"),
    (b"MM\x00*", "a TIFF image, which is not supported"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a zip archive"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x7fELF", "an executable"),
)
_TAIL_BYTES = 64


class BadImageError(ValueError):
    """One or more image files are unreadable, truncated or not images.

    Attributes:
        paths: every offending path (as given to the check), in sorted order.
        reasons: ``{path: reason}`` for each of them.
    """

    def __init__(self, reasons: dict[str, str], *, root: str | os.PathLike | None = None,
                 max_listed: int = 20) -> None:
        self.reasons = dict(sorted(reasons.items()))
        self.paths = list(self.reasons)
        where = f" under {os.fspath(root)!r}" if root is not None else ""
        lines = [f"  {p}: {r}" for p, r in list(self.reasons.items())[:max_listed]]
        if len(self.paths) > max_listed:
            lines.append(f"  ... and {len(self.paths) - max_listed} more")
        super().__init__(
            f"{len(self.paths)} unreadable or truncated image file(s){where} "
            "(a cheap header/trailer check failed; fix or remove them, or pass "
            "on_bad_image='skip' to leave them out of the manifest):\n" + "\n".join(lines)
        )


_EXT_TUPLE = tuple(sorted(IMAGE_EXTENSIONS))


def is_image_name(name: str) -> bool:
    """True when ``name`` ends in one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(_EXT_TUPLE)


def check_image_file(path: str | os.PathLike, *, read_size: bool = True) -> str | None:
    """Check one image file cheaply; return ``None`` if it looks sound, else the reason.

    Reads at most the first 32 and the last 64 bytes. The format is identified by its magic
    bytes, not by the file name:

    - JPEG: starts with the SOI marker ``FF D8 FF`` and ends with the EOI marker ``FF D9``
      (trailing zero padding, which some encoders append, is tolerated);
    - PNG: the 8-byte signature and an ``IEND`` chunk in the last bytes;
    - BMP: ``BM`` and the file size recorded in the header equals the size on disk.

    With ``read_size`` PIL then parses the header only (``Image.open`` is lazy: no pixel decode)
    and the image must have a positive width and height.
    """
    try:
        with open(path, "rb") as fh:
            return _check_open_file(fh, read_size)
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"


def _content_kind(head: bytes) -> str:
    """A name for what a non-image file holds, from its magic bytes; never the bytes themselves."""
    for magic, kind in _OTHER_FORMATS:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image, which is not supported"
    if head[4:8] == b"ftyp":
        return "an ISO media file (HEIC/AVIF/MP4), which is not supported"
    if all(b in b"\t\n\r" or 32 <= b for b in head):
        return "text content"
    return "unrecognised binary content"


def _check_open_file(fh: BinaryIO, read_size: bool) -> str | None:
    size = os.fstat(fh.fileno()).st_size
    if size == 0:
        return "empty file (0 bytes)"
    head = fh.read(_HEAD_BYTES)
    if size > _TAIL_BYTES:
        fh.seek(size - _TAIL_BYTES)
        tail = fh.read(_TAIL_BYTES)
    else:
        tail = head

    if head.startswith(_JPEG_SOI):
        if not tail.rstrip(b"\x00").endswith(_JPEG_EOI):
            return "truncated JPEG (no end-of-image marker FFD9 at the end of the file)"
    elif head.startswith(_PNG_SIGNATURE):
        if _PNG_IEND not in tail:
            return "truncated PNG (no IEND chunk at the end of the file)"
    elif head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        if declared != size:
            return f"truncated BMP (header declares {declared} bytes, file has {size})"
    else:
        # Never echo the bytes: the file may be anything (a link to /etc/passwd, a key file).
        return f"not a JPEG, PNG or BMP image ({_content_kind(head)})"

    if read_size:
        from PIL import Image, UnidentifiedImageError

        fh.seek(0)
        try:
            with Image.open(fh) as img:
                width, height = img.size
        except Image.DecompressionBombError as exc:
            return f"decompression bomb refused ({exc})"
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"image header cannot be parsed ({exc})"
        if width <= 0 or height <= 0:
            return f"image has no pixels ({width}x{height})"
    return None


def find_bad_images(paths: Iterable[str | os.PathLike], *, read_size: bool = True,
                    workers: int = 1) -> dict[str, str]:
    """Run :func:`check_image_file` over ``paths``; return ``{path: reason}`` for the bad ones.

    Sequential by default: with the files in the page cache, threads only add GIL contention
    (measured 2x slower with 4 threads on ~32k small JPEGs); on a cold network disk a few
    ``workers`` hide latency. The result is ordered by path and does not depend on ``workers``.
    """
    items: Sequence[str] = [os.fspath(p) for p in paths]
    if not items:
        return {}

    def _check(p: str) -> tuple[str, str | None]:
        return p, check_image_file(p, read_size=read_size)

    if workers <= 1 or len(items) < 256:
        results = map(_check, items)
        bad = {p: r for p, r in results if r is not None}
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            bad = {p: r for p, r in pool.map(_check, items, chunksize=256) if r is not None}
    return dict(sorted(bad.items()))
