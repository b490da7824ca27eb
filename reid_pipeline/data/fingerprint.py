"""Fingerprints of a dataset folder and of a manifest.

Two different questions, two functions:

- :func:`directory_fingerprint` — *did anything on disk change?* Cheap (one ``stat`` per file, no
  reads): relative names, sizes and modification times of the image files and list files. Meant
  for observation (a sensor polling the data folder); touching a file changes it.
- :func:`manifest_fingerprint` — *did the data really change?* The manifest rows (path, pid,
  camid, split, label) plus a SHA-1 of every image's bytes, combined with SHA-256. Re-copying or
  touching files leaves it unchanged; editing, replacing, adding, removing or relabelling an image
  changes it. Meant for the ``DataVersion`` of the manifest asset.

Symbolic links follow the manifest's policy (:class:`~reid_pipeline.data.layouts.LinkResolver`):
the root may itself be a link; entries resolving outside it are skipped (``external_links="skip"``,
the default) or followed (``"keep"``) and counted in a :class:`WalkReport`; a folder already walked
(a symlink loop) is never walked twice.

Neither imports dagster or torch.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .layouts import ExternalLinks, LinkResolver, check_external_links
from .validation import is_image_name

__all__ = ["WalkReport", "directory_fingerprint", "manifest_fingerprint", "file_sha1"]

_MAX_EXAMPLES = 20


@dataclass
class WalkReport:
    """What :func:`directory_fingerprint` left out or followed besides ordinary files.

    ``external``: entries (relative paths) resolving outside the root — skipped or, with
    ``external_links="keep"``, followed; ``loops``: symlink loops and links to a folder already
    walked, never followed; ``unreadable``: folders that could not be listed. Each list keeps
    twenty examples; the ``num_*`` counters count all.
    """

    external_links: str = "skip"
    num_external: int = 0
    external: list[str] = field(default_factory=list)
    num_loops: int = 0
    loops: list[str] = field(default_factory=list)
    num_unreadable: int = 0
    unreadable: list[str] = field(default_factory=list)

    def _add(self, kind: str, rel: str) -> None:
        setattr(self, f"num_{kind}", getattr(self, f"num_{kind}") + 1)
        examples = getattr(self, kind)
        if len(examples) < _MAX_EXAMPLES:
            examples.append(rel)

_FINGERPRINT_VERSION = b"reid_pipeline.manifest_fingerprint.v1\n"
_DIRECTORY_VERSION = b"reid_pipeline.directory_fingerprint.v1\n"


def _walk_files(root: Path, external_links: str, report: WalkReport):
    """Yield ``(relative posix path, stat)`` of image and ``.txt`` files under ``root``.

    Folders are visited once each (by device and inode), in sorted order, so symlink loops end
    and the walk is deterministic.
    """
    resolver = LinkResolver(root)
    try:
        st_root = os.stat(root)
    except OSError:
        return
    visited = {(st_root.st_dev, st_root.st_ino)}
    stack = [(os.fspath(root), "")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name, reverse=True)  # popped in name order
        except OSError:
            report._add("unreadable", prefix or ".")
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            wanted_file = is_image_name(entry.name) or entry.name.endswith(".txt")
            try:
                if entry.is_symlink():
                    verdict = resolver.classify(entry.path)
                    if verdict == "loop":
                        report._add("loops", rel)
                        continue
                    if verdict == "external":
                        report._add("external", rel)
                        if external_links == "skip":
                            continue
                    st = os.stat(entry.path)  # follows the link
                else:
                    st = entry.stat(follow_symlinks=False)
            except OSError:  # dangling link or vanished entry: not a data file
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name.startswith("."):
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    report._add("loops", rel + "/")
                    continue
                visited.add(key)
                stack.append((entry.path, rel + "/"))
            elif stat.S_ISREG(st.st_mode) and wanted_file:
                yield rel, st


def directory_fingerprint(
    root: str | os.PathLike, *, external_links: ExternalLinks = "skip", report: WalkReport | None = None
) -> str:
    """SHA-256 hex digest of the relative names, sizes and mtimes of the data files under ``root``.

    Data files are images (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``) and ``.txt`` list files,
    found recursively; hidden folders are skipped. Costs one ``stat`` per file and reads nothing.
    Entries whose symlinks resolve outside ``root`` are skipped (default) or followed
    (``external_links="keep"``); symlink loops are never followed. Pass a :class:`WalkReport` as
    ``report`` to learn what was skipped.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a directory.
    """
    check_external_links(external_links)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist or is not a directory")
    walk = report if report is not None else WalkReport()
    walk.external_links = external_links
    h = hashlib.sha256(_DIRECTORY_VERSION)
    for rel, st in sorted(_walk_files(root, external_links, walk)):
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
