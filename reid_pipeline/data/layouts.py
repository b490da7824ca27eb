"""Dataset layouts: where the images of each split live and how a file name encodes its labels.

Four layouts, tried in this order by auto-detection (:func:`detect_layout`):

``msmt17``
    MSMT17 V1 or V2. A folder (the root itself or a child/grand-child named ``MSMT17_V1``,
    ``MSMT17_V2``, ``MSMT17`` or ``msmt17``, any case) holding ``list_train.txt``,
    ``list_query.txt`` and ``list_gallery.txt`` (``list_val.txt`` optional), with the training
    images under ``train/`` (V1, and CLIP-ReID's copy) or ``mask_train_v2/`` (V2) and the test
    images under ``test/`` or ``mask_test_v2/``. Each list line is ``<relative path> <pid>``;
    the camera is the third ``_`` field of the file name minus one
    (``0000_000_01_0303morning_0015_0.jpg`` → camera 0). ``list_val`` is merged into train, as
    CLIP-ReID does. Query/gallery pids are numbered independently of train pids (both start at 0),
    exactly as in the released lists.

``dukemtmc``
    DukeMTMC-reID: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` (directly under the
    root or under ``DukeMTMC-reID/``), Market naming, cameras ``c1``..``c8``. Auto-detection picks
    it when the dataset folder (or the root) is named ``DukeMTMC-reID`` (any case, with or without
    the dash), or when the Market-style tree uses a camera id of 7 or 8.

``market1501``
    Market-1501: the same three folders (directly under the root or under
    ``Market-1501-v15.09.15/`` or ``market1501/``), names such as ``0002_c1s1_000451_03.jpg``
    matched by the field's regex ``([-\\d]+)_c(\\d)`` anchored at the start of the name; pid -1 is
    junk and dropped, pid 0 (distractors) is kept; cameras ``c1``..``c6`` → 0..5. Auto-detection
    picks it when every parsable camera id is at most 6.

``market_style``
    A user's own data in the Market naming convention: either the three Market folders or, as a
    generic fallback, ``train/``, ``query/``, ``gallery/``; names ``<pid>_c<camera>...`` with
    ``<camera>`` one or more digits starting at 1 (regex ``^(-1|\\d+)_c(\\d+)``), pid -1 dropped as
    junk, pid 0 kept as distractor, any number of cameras.

Only files whose suffix is ``.jpg``, ``.jpeg``, ``.png`` or ``.bmp`` are images; every other file
(``Thumbs.db``, ``.DS_Store``), every image whose name does not parse (``foo.jpg``) or whose camera
is out of range, and every sub-folder inside a split folder is skipped and counted.

An explicit layout name skips the heuristics (folder names, camera range) and only requires the
folder structure of that layout.

Symbolic links: the root itself may be a link. An entry under it that resolves outside the (real)
root is an *external link*; :class:`LinkResolver` classifies paths so that the manifest and the
directory fingerprint apply one policy (``external_links``: ``"skip"``, the default, leaves such
entries out and reports them; ``"keep"`` follows them). A symlink loop is never followed.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

from .validation import is_image_name

__all__ = [
    "SPLITS",
    "EXTERNAL_LINK_POLICIES",
    "ExternalLinks",
    "DatasetLayoutError",
    "LinkResolver",
    "check_external_links",
    "ParsedDataset",
    "Layout",
    "MarketLayout",
    "MSMT17Layout",
    "LAYOUTS",
    "get_layout",
    "detect_layout",
]

#: Manifest split names, in manifest order.
SPLITS: tuple[str, ...] = ("train", "query", "gallery")

_MAX_EXAMPLES = 5


class DatasetLayoutError(ValueError):
    """The dataset root is missing pieces, matches no known layout, or has no parsable image."""


ExternalLinks = Literal["skip", "keep"]
#: What to do with entries whose symlinks resolve outside the data root.
EXTERNAL_LINK_POLICIES: tuple[str, ...] = ("skip", "keep")


def check_external_links(value: str) -> str:
    """``value`` if it is a valid ``external_links`` policy, else a ``ValueError`` naming the choices."""
    if value not in EXTERNAL_LINK_POLICIES:
        raise ValueError(f"external_links must be one of {list(EXTERNAL_LINK_POLICIES)}, got {value!r}")
    return value


class LinkResolver:
    """Classifies paths under a data root by where their symbolic links lead.

    :meth:`classify` returns ``None`` for a path that stays inside the real root (or is not there
    at all: the image check reports missing files), ``"external"`` for one that resolves outside
    it and ``"loop"`` for a symlink loop. Real paths of folders are cached, so a manifest of ~32k
    images costs one ``lstat`` per file and one ``realpath`` per folder and per link.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.real_root = os.path.realpath(self.root)
        self._folders: dict[str, str] = {}

    def inside(self, real: str) -> bool:
        """True when the real path ``real`` is the root or under it."""
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)

    def classify(self, path: str | os.PathLike) -> str | None:
        path = os.fspath(path)
        parent, _ = os.path.split(path)
        real_parent = self._folders.get(parent)
        if real_parent is None:
            try:
                real_parent = os.path.realpath(parent, strict=True)
            except FileNotFoundError:
                return None
            except OSError:
                return "loop"
            self._folders[parent] = real_parent
        if os.path.islink(path):
            try:
                real = os.path.realpath(path, strict=True)
            except FileNotFoundError:
                return None  # a dangling link: "file not found" for the image check
            except OSError:
                return "loop"
        else:
            real = os.path.join(real_parent, os.path.basename(path))
        return None if self.inside(real) else "external"


@dataclass
class ParsedDataset:
    """What a layout read from disk, before any validation or labelling.

    ``records`` holds ``(path, pid, camid, split)`` with ``path`` relative to the root given by the
    caller (POSIX separators) and ``camid`` already 0-based.
    """

    layout: str
    root: Path
    dataset_dir: Path
    records: list[tuple[str, int, int, str]] = field(default_factory=list)
    num_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    junk_by_split: dict[str, int] = field(default_factory=dict)

    def skip(self, relpath: str, reason: str) -> None:
        """Count one skipped entry and keep the first few as examples."""
        self.num_skipped += 1
        if len(self.skipped_examples) < _MAX_EXAMPLES:
            self.skipped_examples.append(f"{relpath} ({reason})")

    def junk(self, split: str) -> None:
        """Count one dropped junk image (pid -1) in ``split``."""
        self.junk_by_split[split] = self.junk_by_split.get(split, 0) + 1


def _rel(root: Path, path: Path) -> PurePosixPath:
    """``path`` relative to ``root`` as a POSIX path (``.`` when equal)."""
    return PurePosixPath(Path(os.path.relpath(path, root)).as_posix())


def _entry_is_dir(entry: os.DirEntry) -> bool:
    """``entry.is_dir()``, False for a symlink loop (which makes ``is_dir`` raise ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name`` (exact match first, then any case)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    try:
        with os.scandir(parent) as it:
            for entry in it:
                if entry.name.lower() == name.lower() and _entry_is_dir(entry):
                    return Path(entry.path)
    except OSError:
        return None
    return None


def _candidate_dirs(root: Path, names: tuple[str, ...]) -> list[Path]:
    """``root``, then its children named one of ``names``, then such grand-children."""
    out = [root]
    for name in names:
        child = _child_dir(root, name)
        if child is not None:
            out.append(child)
            for sub in names:
                grand = _child_dir(child, sub)
                if grand is not None and grand != child:
                    out.append(grand)
    return out


class Layout(ABC):
    """A dataset layout: how to find the dataset folder under a root and how to parse it."""

    #: Short identifier used by ``build_manifest(layout=...)``.
    name: str
    #: One line a person can act on: what the layout expects on disk.
    expects: str

    @abstractmethod
    def locate(self, root: Path, *, strict: bool = True, cache: dict | None = None) -> Path | None:
        """Return the dataset folder under ``root`` if this layout applies, else ``None``.

        ``strict`` adds the auto-detection heuristics (folder names, camera ranges); an explicit
        layout choice calls this with ``strict=False`` and only the folder structure counts.
        ``cache`` lets the layouts tried by one detection share what they read from disk.
        """

    @abstractmethod
    def parse(self, root: Path, dataset_dir: Path) -> ParsedDataset:
        """Read every split of the dataset found at ``dataset_dir`` (paths relative to ``root``)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


class MarketLayout(Layout):
    """Market-1501 naming in split folders; parametrised for Market, Duke and own data.

    Args:
        name: layout name.
        expects: description for error messages.
        split_dirs: alternatives, each mapping split → folder name; the first complete one wins.
        parent_names: folder names under the root that may hold the split folders.
        num_cameras: highest valid camera id in names (``None``: unbounded).
        pattern: regex with groups (pid, camera) matched at the start of the file name.
        dataset_names: folder names (lower case, dashes removed) that identify this dataset in
            auto-detection.
        detect_cameras: inclusive camera-id range: auto-detection claims the tree when some
            parsable name uses a camera in it and none uses a higher one.
        max_camera_for_detection: auto-detection claims the tree when no parsable name uses a
            higher camera id (used when ``detect_cameras`` is ``None``; both ``None``: any tree
            with the folders).
    """

    def __init__(
        self,
        name: str,
        expects: str,
        *,
        split_dirs: tuple[dict[str, str], ...],
        parent_names: tuple[str, ...],
        num_cameras: int | None,
        pattern: str,
        dataset_names: tuple[str, ...] = (),
        detect_cameras: tuple[int, int] | None = None,
        max_camera_for_detection: int | None = None,
    ) -> None:
        self.name = name
        self.expects = expects
        self.split_dirs = split_dirs
        self.parent_names = parent_names
        self.num_cameras = num_cameras
        self.regex = re.compile(pattern)
        self.dataset_names = dataset_names
        self.detect_cameras = detect_cameras
        self.max_camera_for_detection = max_camera_for_detection

    # -- structure ---------------------------------------------------------------------------
    def _split_folders(self, directory: Path) -> dict[str, Path] | None:
        for alternative in self.split_dirs:
            found = {s: directory / d for s, d in alternative.items()}
            if all(p.is_dir() for p in found.values()):
                return found
        return None

    def _find_tree(self, root: Path) -> tuple[Path, dict[str, Path]] | None:
        for cand in _candidate_dirs(root, self.parent_names):
            folders = self._split_folders(cand)
            if folders is not None:
                return cand, folders
        return None

    def _camera_ids(self, folders: dict[str, Path], cache: dict | None) -> set[int]:
        """Camera ids used by parsable image names; ``cache`` is shared within one detection."""
        key = (self.regex.pattern, *map(str, folders.values()))
        if cache is not None and key in cache:
            return cache[key]
        cams: set[int] = set()
        match = self.regex.match
        for folder in folders.values():
            with os.scandir(folder) as it:
                for entry in it:
                    m = match(entry.name)
                    if m is not None and is_image_name(entry.name):
                        cams.add(int(m.group(2)))
        if cache is not None:
            cache[key] = cams
        return cams

    def _named_as_dataset(self, root: Path, dataset_dir: Path) -> bool:
        """True when the root or a folder between it and the split folders bears the name."""
        names = [root.resolve().name, *dataset_dir.relative_to(root).parts]
        normalised = {n.lower().replace("-", "").replace("_", "") for n in names}
        return any(d in normalised for d in self.dataset_names)

    def locate(self, root: Path, *, strict: bool = True, cache: dict | None = None) -> Path | None:
        tree = self._find_tree(root)
        if tree is None:
            return None
        dataset_dir, folders = tree
        if not strict:
            return dataset_dir
        if self.dataset_names and self._named_as_dataset(root, dataset_dir):
            return dataset_dir
        if self.detect_cameras is None and self.max_camera_for_detection is None:
            return dataset_dir
        cams = self._camera_ids(folders, cache)
        if self.detect_cameras is not None:
            lo, hi = self.detect_cameras
            if any(lo <= c <= hi for c in cams) and max(cams) <= hi:
                return dataset_dir
            return None
        if not cams or max(cams) <= self.max_camera_for_detection:  # type: ignore[operator]
            return dataset_dir
        return None

    # -- parsing -----------------------------------------------------------------------------
    def parse(self, root: Path, dataset_dir: Path) -> ParsedDataset:
        folders = self._split_folders(dataset_dir)
        if folders is None:
            raise DatasetLayoutError(
                f"{dataset_dir} does not have the folders layout {self.name!r} expects: {self.expects}"
            )
        result = ParsedDataset(layout=self.name, root=root, dataset_dir=dataset_dir)
        match = self.regex.match
        max_cam = self.num_cameras
        records = result.records
        for split in SPLITS:
            folder = folders[split]
            prefix = _rel(root, folder)
            prefix_str = "" if str(prefix) == "." else f"{prefix}/"
            with os.scandir(folder) as it:
                entries = sorted((e.name, _entry_is_dir(e)) for e in it)
            for name, is_dir in entries:
                rel = prefix_str + name
                if is_dir:
                    result.skip(rel + "/", "sub-folder inside a split folder is not read")
                    continue
                if not is_image_name(name):
                    result.skip(rel, "not an image file")
                    continue
                m = match(name)
                if m is None:
                    result.skip(rel, "name does not match <pid>_c<camera>")
                    continue
                try:
                    pid = int(m.group(1))
                except ValueError:
                    result.skip(rel, f"pid {m.group(1)!r} is not an integer")
                    continue
                cam = int(m.group(2))
                if pid == -1:
                    result.junk(split)
                    continue
                if pid < -1:
                    result.skip(rel, f"pid {pid} is negative")
                    continue
                if cam < 1 or (max_cam is not None and cam > max_cam):
                    bound = f"1..{max_cam}" if max_cam is not None else ">= 1"
                    result.skip(rel, f"camera c{cam} outside {bound}")
                    continue
                records.append((rel, pid, cam - 1, split))
        return result


class MSMT17Layout(Layout):
    """MSMT17 V1/V2: list files ``list_{train,val,query,gallery}.txt`` plus two image folders."""

    name = "msmt17"
    expects = (
        "list_train.txt, list_query.txt, list_gallery.txt (list_val.txt optional) with "
        "'<relative path> <pid>' lines, images under train/ or mask_train_v2/ and test/ or "
        "mask_test_v2/ (in the root or in MSMT17_V1/, MSMT17_V2/, MSMT17/)"
    )
    parent_names = ("MSMT17_V1", "MSMT17_V2", "MSMT17", "msmt17")
    train_dirs = ("train", "mask_train_v2")
    test_dirs = ("test", "mask_test_v2")
    required_lists = ("list_train.txt", "list_query.txt", "list_gallery.txt")

    def _image_dir(self, directory: Path, names: tuple[str, ...]) -> Path | None:
        for n in names:
            found = _child_dir(directory, n)
            if found is not None:
                return found
        return None

    def _complete(self, directory: Path) -> tuple[Path, Path] | None:
        if not all((directory / f).is_file() for f in self.required_lists):
            return None
        train = self._image_dir(directory, self.train_dirs)
        test = self._image_dir(directory, self.test_dirs)
        if train is None or test is None:
            return None
        return train, test

    def locate(self, root: Path, *, strict: bool = True, cache: dict | None = None) -> Path | None:
        for cand in _candidate_dirs(root, self.parent_names):
            if self._complete(cand) is not None:
                return cand
        return None

    def parse(self, root: Path, dataset_dir: Path) -> ParsedDataset:
        dirs = self._complete(dataset_dir)
        if dirs is None:
            raise DatasetLayoutError(
                f"{dataset_dir} does not have what layout 'msmt17' expects: {self.expects}"
            )
        train_dir, test_dir = dirs
        result = ParsedDataset(layout=self.name, root=root, dataset_dir=dataset_dir)
        lists = [("list_train.txt", train_dir, "train"), ("list_val.txt", train_dir, "train"),
                 ("list_query.txt", test_dir, "query"), ("list_gallery.txt", test_dir, "gallery")]
        for list_name, image_dir, split in lists:
            list_path = dataset_dir / list_name
            if not list_path.is_file():  # only list_val.txt may be absent
                continue
            prefix = _rel(root, image_dir)
            list_rel = _rel(root, list_path)
            with open(list_path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    where = f"{list_rel}:{lineno}"
                    if len(parts) != 2:
                        result.skip(where, "expected '<relative path> <pid>'")
                        continue
                    img, pid_text = parts
                    try:
                        pid = int(pid_text)
                    except ValueError:
                        result.skip(where, f"pid {pid_text!r} is not an integer")
                        continue
                    if pid == -1:
                        result.junk(split)
                        continue
                    if pid < 0:
                        result.skip(where, f"pid {pid} is negative")
                        continue
                    img = img.replace("\\", "/")
                    if not is_image_name(img):
                        result.skip(where, f"{img!r} is not an image file name")
                        continue
                    if img.startswith("/") or ".." in PurePosixPath(img).parts:
                        result.skip(where, f"{img!r} is not a path inside {image_dir.name}/")
                        continue
                    fields = PurePosixPath(img).name.split("_")
                    try:
                        cam = int(fields[2])
                    except (IndexError, ValueError):
                        result.skip(where, f"no camera in the third '_' field of {img!r}")
                        continue
                    if cam < 1:
                        result.skip(where, f"camera {cam} in {img!r} is below 1")
                        continue
                    rel = str(prefix / PurePosixPath(img))
                    result.records.append((rel, pid, cam - 1, split))
        return result


_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_GENERIC_FOLDERS = {"train": "train", "query": "query", "gallery": "gallery"}
_MARKET_REGEX = r"^(-1|\d+)_c(\d)"
_OWN_REGEX = r"^(-1|\d+)_c(\d+)"

#: Every known layout by name, in auto-detection order.
LAYOUTS: dict[str, Layout] = {
    "msmt17": MSMT17Layout(),
    "dukemtmc": MarketLayout(
        "dukemtmc",
        "bounding_box_train/, query/, bounding_box_test/ (in the root or in DukeMTMC-reID/) with "
        "names like 0001_c2_f0046182.jpg, cameras c1..c8; detected by the folder name "
        "DukeMTMC-reID or by camera ids 7-8",
        split_dirs=(_MARKET_FOLDERS,),
        parent_names=("DukeMTMC-reID", "dukemtmc-reid", "dukemtmcreid"),
        num_cameras=8,
        pattern=_MARKET_REGEX,
        dataset_names=("dukemtmcreid",),
        detect_cameras=(7, 8),
    ),
    "market1501": MarketLayout(
        "market1501",
        "bounding_box_train/, query/, bounding_box_test/ (in the root or in "
        "Market-1501-v15.09.15/) with names like 0002_c1s1_000451_03.jpg, cameras c1..c6",
        split_dirs=(_MARKET_FOLDERS,),
        parent_names=("Market-1501-v15.09.15", "market1501", "Market-1501"),
        num_cameras=6,
        pattern=_MARKET_REGEX,
        max_camera_for_detection=6,
    ),
    "market_style": MarketLayout(
        "market_style",
        "your own data: bounding_box_train/, query/, bounding_box_test/ or train/, query/, "
        "gallery/ with names starting <pid>_c<camera> (e.g. 0007_c12_frame3.jpg; pid -1 junk, "
        "0 distractor, cameras from 1)",
        split_dirs=(_MARKET_FOLDERS, _GENERIC_FOLDERS),
        parent_names=(),
        num_cameras=None,
        pattern=_OWN_REGEX,
    ),
}


def get_layout(name: str) -> Layout:
    """The layout called ``name``; a ``DatasetLayoutError`` lists the valid names otherwise."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DatasetLayoutError(
            f"unknown dataset layout {name!r}; expected 'auto' or one of {sorted(LAYOUTS)}"
        ) from None


def _describe_layouts() -> str:
    return "\n".join(f"  - {lay.name}: {lay.expects}" for lay in LAYOUTS.values())


def detect_layout(root: str | os.PathLike, layout: str = "auto") -> tuple[Layout, Path]:
    """Find the layout and dataset folder for ``root``.

    Args:
        root: the dataset root given by the user.
        layout: ``"auto"`` tries :data:`LAYOUTS` in order; a layout name forces that layout
            (only its folder structure is required).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        DatasetLayoutError: ``root`` is empty, or no layout (or not the requested one) matches;
            the message lists the layouts tried and what each expects.
    """
    root = Path(root)
    if not root.exists():
        if root.is_symlink():
            raise FileNotFoundError(
                f"dataset root {str(root)!r} is a symbolic link that does not resolve (dangling or a loop)"
            )
        raise FileNotFoundError(f"dataset root {str(root)!r} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {str(root)!r} is not a directory")
    with os.scandir(root) as it:
        if next(it, None) is None:
            raise DatasetLayoutError(
                f"dataset root {str(root)!r} is empty; expected one of these layouts:\n"
                + _describe_layouts()
            )
    if layout != "auto":
        chosen = get_layout(layout)
        found = chosen.locate(root, strict=False)
        if found is None:
            raise DatasetLayoutError(
                f"dataset root {str(root)!r} does not match the requested layout {layout!r}, "
                f"which expects: {chosen.expects}"
            )
        return chosen, found
    shared: dict = {}
    for candidate in LAYOUTS.values():
        found = candidate.locate(root, strict=True, cache=shared)
        if found is not None:
            return candidate, found
    try:
        with os.scandir(root) as it:
            listing = sorted(e.name + ("/" if _entry_is_dir(e) else "") for e in it)
    except OSError:
        listing = []
    shown = ", ".join(listing[:10]) + (", ..." if len(listing) > 10 else "")
    raise DatasetLayoutError(
        f"no known dataset layout recognised under {str(root)!r} (it contains: {shown}). "
        f"Layouts tried, in order, and what each expects:\n" + _describe_layouts()
    )
