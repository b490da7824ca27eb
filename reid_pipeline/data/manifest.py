"""The dataset manifest: one row per image with its identity, camera, split and training label.

``build_manifest(root)`` detects the layout (see :mod:`reid_pipeline.data.layouts`), parses the
file names or list files, optionally checks every image cheaply, and returns a pandas DataFrame

===========  =======  =====================================================================
column       dtype    meaning
===========  =======  =====================================================================
``path``     str      image path relative to ``root``, POSIX separators
``pid``      int64    person id as in the dataset (0 = distractor; junk -1 is dropped)
``camid``    int64    camera, 0-based
``split``    str      ``train`` | ``query`` | ``gallery``
``label``    int64    0..C-1 over the train pids in sorted pid order; -1 outside train
===========  =======  =====================================================================

sorted by split (train, query, gallery) then path, with a fresh ``RangeIndex``. What was skipped,
dropped or found broken is described by a :class:`ManifestReport`
(:func:`build_manifest_with_report`, or ``df.attrs["report"]`` as a plain dict).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from .layouts import (
    SPLITS,
    DatasetLayoutError,
    ExternalLinks,
    LinkResolver,
    ParsedDataset,
    check_external_links,
    detect_layout,
)
from .validation import BadImageError, find_bad_images

__all__ = [
    "MANIFEST_COLUMNS",
    "ManifestReport",
    "build_manifest",
    "build_manifest_with_report",
    "summarize_manifest",
]

#: Column order of every manifest.
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "pid", "camid", "split", "label")

OnBadImage = Literal["error", "skip"]


@dataclass
class ManifestReport:
    """What :func:`build_manifest_with_report` saw besides the manifest rows.

    Attributes:
        layout: name of the layout used.
        root: the dataset root as given.
        dataset_dir: the folder the layout read, relative to ``root`` (``.`` for the root itself).
        num_images: manifest rows per split.
        num_skipped: files or list lines skipped because their name did not parse (or was not an
            image, or had an out-of-range camera).
        skipped_examples: up to five of them, each with its reason.
        num_junk: images with pid -1 dropped, as the Market protocol does.
        junk_by_split: the same per split.
        images_checked: whether the cheap header check ran.
        bad_images: paths (relative to ``root``) that failed the check and were left out
            (only with ``on_bad_image="skip"``; otherwise :class:`BadImageError` is raised).
        bad_image_reasons: ``{path: reason}`` for ``bad_images``.
        external_links: the policy for entries whose symlinks resolve outside the real root
            (``"skip"`` or ``"keep"``).
        num_external_links: how many listed images resolve outside the root.
        external_link_examples: up to twenty of them (paths relative to ``root``).
        num_symlink_loops: listed images that are symlink loops (always left out).
        symlink_loop_examples: up to twenty of them.
        warnings: things a person should look at (single-camera split, empty split, ...).
    """

    layout: str
    root: str
    dataset_dir: str
    num_images: dict[str, int] = field(default_factory=dict)
    num_skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    num_junk: int = 0
    junk_by_split: dict[str, int] = field(default_factory=dict)
    images_checked: bool = False
    bad_images: list[str] = field(default_factory=list)
    bad_image_reasons: dict[str, str] = field(default_factory=dict)
    external_links: str = "skip"
    num_external_links: int = 0
    external_link_examples: list[str] = field(default_factory=list)
    num_symlink_loops: int = 0
    symlink_loop_examples: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (for Dagster metadata or a sidecar file)."""
        return asdict(self)


_MAX_LINK_EXAMPLES = 20


def _apply_link_policy(
    records: list[tuple[str, int, int, str]], root: Path, policy: str, report: ManifestReport
) -> list[tuple[str, int, int, str]]:
    """Drop symlink loops and (with ``policy="skip"``) entries that resolve outside ``root``."""
    resolver = LinkResolver(root)
    verdicts = {rel: resolver.classify(os.path.join(root, rel)) for rel in sorted({r[0] for r in records})}
    external = [rel for rel, v in verdicts.items() if v == "external"]
    loops = [rel for rel, v in verdicts.items() if v == "loop"]
    report.num_external_links = len(external)
    report.external_link_examples = external[:_MAX_LINK_EXAMPLES]
    report.num_symlink_loops = len(loops)
    report.symlink_loop_examples = loops[:_MAX_LINK_EXAMPLES]
    drop = set(loops) | (set(external) if policy == "skip" else set())
    return [r for r in records if r[0] not in drop] if drop else records


def _check_on_bad_image(value: str) -> None:
    if value not in ("error", "skip"):
        raise ValueError(f"on_bad_image must be 'error' or 'skip', got {value!r}")


def _frame(records: list[tuple[str, int, int, str]]) -> pd.DataFrame:
    """Records → sorted manifest DataFrame with labels."""
    if records:
        paths, pids, cams, splits = zip(*records)
    else:
        paths, pids, cams, splits = (), (), (), ()
    df = pd.DataFrame(
        {
            "path": pd.Series(paths, dtype=str),
            "pid": np.asarray(pids, dtype=np.int64),
            "camid": np.asarray(cams, dtype=np.int64),
            "split": pd.Series(splits, dtype=str),
        }
    )
    order = {s: i for i, s in enumerate(SPLITS)}
    df["_order"] = df["split"].map(order).astype(np.int64)
    df = df.sort_values(["_order", "path"], kind="mergesort").drop(columns="_order")
    df = df.drop_duplicates(subset=["split", "path"], keep="first").reset_index(drop=True)
    pid = df["pid"].to_numpy()
    is_train = (df["split"] == "train").to_numpy()
    train_pids = np.unique(pid[is_train])
    label = np.full(len(df), -1, dtype=np.int64)
    label[is_train] = np.searchsorted(train_pids, pid[is_train])
    df["label"] = label
    return df[list(MANIFEST_COLUMNS)]


def _warnings(df: pd.DataFrame, layout: str) -> list[str]:
    """Sanity warnings about the evaluation protocol."""
    out: list[str] = []
    for split in SPLITS:
        part = df[df["split"] == split]
        if part.empty:
            out.append(f"split '{split}' is empty")
            continue
        cams = part["camid"].unique()
        if len(cams) == 1:
            out.append(
                f"split '{split}' has images from a single camera (camid {int(cams[0])}): the "
                "Market protocol would discard every same-camera match"
            )
    query = df[df["split"] == "query"]
    gallery = df[df["split"] == "gallery"]
    if not query.empty and not gallery.empty:
        g_cams = gallery.groupby("pid")["camid"].agg(lambda c: frozenset(c.tolist())).to_dict()
        unmatched = set()
        for pid, cam in zip(query["pid"].tolist(), query["camid"].tolist()):
            if not (g_cams.get(pid, frozenset()) - {cam}):
                unmatched.add(pid)
        if unmatched:
            out.append(
                f"{len(unmatched)} query identities have no gallery image from another camera; "
                "their queries are ignored by the Market protocol "
                f"(e.g. pids {sorted(unmatched)[:5]})"
            )
    distract = df[(df["pid"] == 0) & (df["split"] != "gallery")]
    if not distract.empty:
        where = sorted(distract["split"].unique().tolist())
        out.append(
            f"{len(distract)} distractor images (pid 0) outside the gallery (in {where}); "
            "pid 0 is treated as an ordinary identity there"
        )
    if layout != "msmt17":  # MSMT17 numbers train and test pids independently
        train_ids = set(df.loc[df["split"] == "train", "pid"].tolist()) - {0}
        test_ids = set(df.loc[df["split"] != "train", "pid"].tolist()) - {0}
        shared = train_ids & test_ids
        if shared:
            out.append(
                f"{len(shared)} identities appear in both train and query/gallery "
                f"(e.g. pids {sorted(shared)[:5]}); the Market protocol expects them disjoint"
            )
    return out


def build_manifest_with_report(
    root: str | os.PathLike,
    layout: str = "auto",
    check_images: bool = True,
    on_bad_image: OnBadImage = "error",
    *,
    read_image_size: bool = True,
    external_links: ExternalLinks = "skip",
) -> tuple[pd.DataFrame, ManifestReport]:
    """Build the manifest of the dataset under ``root`` and report what was left out.

    Args:
        root: dataset root (see :mod:`reid_pipeline.data.layouts` for what each layout expects).
        layout: ``"auto"`` or a name from ``LAYOUTS`` to force one.
        check_images: run the cheap header/trailer check on every image (and, for MSMT17, that
            each listed file exists). ``False`` trusts the file names alone.
        on_bad_image: ``"error"`` raises :class:`BadImageError` listing every bad path;
            ``"skip"`` leaves them out and lists them in the report.
        read_image_size: with ``check_images``, also let PIL parse each header (no decode).
        external_links: ``"skip"`` (default) leaves out images whose symlinks resolve outside the
            real root, ``"keep"`` follows them; either way they are counted in the report. The root
            itself may be a link. Symlink loops are always left out and counted.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DatasetLayoutError: ``root`` is empty, matches no layout, or no image name parses.
        BadImageError: some image failed the check and ``on_bad_image="error"``.
    """
    _check_on_bad_image(on_bad_image)
    check_external_links(external_links)
    root_path = Path(root)
    chosen, dataset_dir = detect_layout(root_path, layout)
    parsed: ParsedDataset = chosen.parse(root_path, dataset_dir)
    if not parsed.records:
        num_junk = sum(parsed.junk_by_split.values())
        if parsed.num_skipped == 0 and num_junk == 0:
            what = "there are no image files in its split folders"
        elif parsed.num_skipped == 0:
            what = f"every image is junk (pid -1): {num_junk} dropped"
        else:
            what = (f"only junk: {parsed.num_skipped} entries skipped, {num_junk} junk images (pid -1) "
                    f"dropped; e.g. {'; '.join(parsed.skipped_examples)}")
        raise DatasetLayoutError(
            f"nothing usable under {str(dataset_dir)!r}: no image could be parsed with layout "
            f"{chosen.name!r} ({what}). Layout {chosen.name!r} expects: {chosen.expects}"
        )

    report = ManifestReport(
        layout=chosen.name,
        root=os.fspath(root),
        dataset_dir=Path(os.path.relpath(dataset_dir, root_path)).as_posix(),
        num_skipped=parsed.num_skipped,
        skipped_examples=list(parsed.skipped_examples),
        num_junk=sum(parsed.junk_by_split.values()),
        junk_by_split={s: parsed.junk_by_split[s] for s in SPLITS if s in parsed.junk_by_split},
        images_checked=check_images,
        external_links=external_links,
    )

    records = _apply_link_policy(parsed.records, root_path, external_links, report)
    if not records:
        raise DatasetLayoutError(
            f"every image under {str(dataset_dir)!r} is a symbolic link that resolves outside the data root "
            f"{str(root_path)!r} or loops ({report.num_external_links} external, {report.num_symlink_loops} "
            f"loops; e.g. {(report.external_link_examples + report.symlink_loop_examples)[:3]}); pass "
            "external_links='keep' to follow links out of the root"
        )
    if check_images:
        unique_paths = sorted({r[0] for r in records})
        bad_abs = find_bad_images((os.path.join(root_path, p) for p in unique_paths),
                                  read_size=read_image_size)
        if bad_abs:
            bad = {Path(os.path.relpath(p, root_path)).as_posix(): why for p, why in bad_abs.items()}
            if on_bad_image == "error":
                raise BadImageError(bad, root=root_path)
            report.bad_images = sorted(bad)
            report.bad_image_reasons = dict(sorted(bad.items()))
            records = [r for r in records if r[0] not in bad]
            if not records:
                raise BadImageError(bad, root=root_path)

    df = _frame(records)
    report.num_images = {s: int((df["split"] == s).sum()) for s in SPLITS}
    report.warnings = _warnings(df, chosen.name)
    if report.num_external_links:
        verb = "left out" if external_links == "skip" else "kept (external_links='keep')"
        report.warnings.append(
            f"{report.num_external_links} images are symbolic links resolving outside the data root, "
            f"{verb} (e.g. {report.external_link_examples[:3]})"
        )
    if report.num_symlink_loops:
        report.warnings.append(
            f"{report.num_symlink_loops} images are symlink loops, left out (e.g. {report.symlink_loop_examples[:3]})"
        )
    if report.bad_images:
        report.warnings.append(
            f"{len(report.bad_images)} unreadable or truncated images left out "
            f"(e.g. {report.bad_images[:3]})"
        )
    return df, report


def build_manifest(
    root: str | os.PathLike,
    layout: str = "auto",
    check_images: bool = True,
    on_bad_image: OnBadImage = "error",
    *,
    read_image_size: bool = True,
    external_links: ExternalLinks = "skip",
) -> pd.DataFrame:
    """Manifest DataFrame of the dataset under ``root``; the report is in ``df.attrs["report"]``.

    See :func:`build_manifest_with_report` for the arguments and errors.
    """
    df, report = build_manifest_with_report(
        root, layout, check_images, on_bad_image, read_image_size=read_image_size, external_links=external_links
    )
    df.attrs["report"] = report.to_dict()
    return df


def summarize_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """Per split (train, query, gallery): number of images, identities and cameras.

    Identities count every distinct pid, distractors (pid 0) included, as the usual dataset
    statistics do (Market-1501 gallery: 751 = 750 test ids + pid 0).
    """
    missing = [c for c in ("pid", "camid", "split") if c not in df.columns]
    if missing:
        raise ValueError(f"manifest is missing columns {missing}; expected {list(MANIFEST_COLUMNS)}")
    rows = []
    for split in SPLITS:
        part = df[df["split"] == split]
        rows.append(
            {
                "split": split,
                "images": int(len(part)),
                "identities": int(part["pid"].nunique()),
                "cameras": int(part["camid"].nunique()),
            }
        )
    return pd.DataFrame(rows).set_index("split")
