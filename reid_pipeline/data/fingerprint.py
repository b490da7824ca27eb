"""Fingerprints of a dataset folder and of a manifest.

Two different questions, two functions:

- :func:`directory_fingerprint` — *did anything on disk change?* Cheap (one ``stat`` per file, no
  reads): relative names, sizes and modification times of the image files and list files. Meant
  for observation (a sensor polling the data folder); touching a file changes it.
- :func:`manifest_fingerprint` — *did the data really change?* The manifest rows (path, pid,
  camid, split, label) plus a SHA-1 of every image's bytes, combined with SHA-256. Re-copying or
  touching files leaves it unchanged; editing, replacing, adding, removing or relabelling an image
  changes it. Meant for the ``DataVersion`` of the manifest asset.

Neither imports dagster or torch.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from .validation import is_image_name

__all__ = ["directory_fingerprint", "manifest_fingerprint", "file_sha1"]

_FINGERPRINT_VERSION = b"reid_pipeline.manifest_fingerprint.v1\n"
_DIRECTORY_VERSION = b"reid_pipeline.directory_fingerprint.v1\n"


def _walk_files(root: Path):
    """Yield ``(relative posix path, stat)`` of image and ``.txt`` files under ``root``."""
    stack = [(root, "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir():
                if not entry.name.startswith("."):
                    stack.append((Path(entry.path), rel + "/"))
            elif entry.is_file() and (is_image_name(entry.name) or entry.name.endswith(".txt")):
                yield rel, entry.stat()


def directory_fingerprint(root: str | os.PathLike) -> str:
    """SHA-256 hex digest of the relative names, sizes and mtimes of the data files under ``root``.

    Data files are images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``) and ``.txt`` list files,
    found recursively; hidden folders are skipped. Costs one ``stat`` per file and reads nothing.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a directory")
    h = hashlib.sha256(_DIRECTORY_VERSION)
    for rel, st in sorted(_walk_files(root)):
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def file_sha1(path: str | os.PathLike) -> str:
    """SHA-1 hex digest of a file's bytes."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha1").hexdigest()


def manifest_fingerprint(df: pd.DataFrame, root: str | os.PathLike, *, workers: int = 1) -> str:
    """SHA-256 hex content fingerprint of a manifest and the bytes of the files it lists.

    Hashes, in manifest order, each row's ``path``, ``pid``, ``camid``, ``split``, ``label`` and the
    SHA-1 of the file at ``root/path``. Modification times are not part of it, so touching or
    copying the data does not change it. Files are read sequentially by default (threads were
    slower on ~32k small cached files); ``workers`` > 1 may help on a slow network disk. The result
    does not depend on ``workers``.

    Raises:
        ValueError: ``df`` lacks a manifest column.
        FileNotFoundError: a listed file is missing (the message names it).
    """
    missing = [c for c in ("path", "pid", "camid", "split", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}")
    root = Path(root)
    paths = df["path"].astype(str).tolist()
    unique = sorted(set(paths))

    def _digest(rel: str) -> str:
        try:
            return file_sha1(root / rel)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"manifest lists {rel!r} but {str(root / rel)!r} does not exist"
            ) from None

    if workers > 1 and len(unique) > 64:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = dict(zip(unique, pool.map(_digest, unique, chunksize=128)))
    else:
        digests = {p: _digest(p) for p in unique}

    h = hashlib.sha256(_FINGERPRINT_VERSION)
    for path, pid, camid, split, label in zip(
        paths,
        df["pid"].astype("int64").tolist(),
        df["camid"].astype("int64").tolist(),
        df["split"].astype(str).tolist(),
        df["label"].astype("int64").tolist(),
    ):
        h.update(f"{path}\0{pid}\0{camid}\0{split}\0{label}\0{digests[path]}\n".encode())
    return h.hexdigest()
