"""The synthetic Market-style dataset: determinism, layout, counts and a learnability check."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reid_pipeline.data import (
    build_manifest_with_report,
    manifest_fingerprint,
    summarize_manifest,
)
from reid_pipeline.embedded.synthetic import PRESETS, generate_synthetic_dataset, main

TINY = PRESETS["tiny"]
NAME = re.compile(r"^(-1|\d{4})_c[1-9]s[1-6]_\d{6}_\d{2}\.jpg$")


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "tiny"
    info = generate_synthetic_dataset(root, seed=0, **TINY)
    return root, info


def test_same_seed_gives_identical_bytes(tiny, tmp_path: Path) -> None:
    root, _ = tiny
    again = tmp_path / "again"
    generate_synthetic_dataset(again, seed=0, **TINY)
    a, b = files_of(root), files_of(again)
    assert list(a) == list(b)
    assert a == b


def test_drawing_in_threads_gives_the_same_files(tmp_path: Path) -> None:
    # 440 images: above the size at which the images are drawn by several workers
    kwargs = dict(num_ids=50, images_per_id=8, num_test_ids=10, seed=4)
    one = generate_synthetic_dataset(tmp_path / "one", workers=1, **kwargs)
    three = generate_synthetic_dataset(tmp_path / "three", workers=3, **kwargs)
    assert sum(one.num_images.values()) >= 400
    a, b = files_of(tmp_path / "one"), files_of(tmp_path / "three")
    assert list(a) == list(b)
    assert a == b
    assert three.to_dict()["num_images"] == one.to_dict()["num_images"]


def test_different_seed_differs(tiny, tmp_path: Path) -> None:
    root, _ = tiny
    other = tmp_path / "other"
    generate_synthetic_dataset(other, seed=1, **TINY)
    a, b = files_of(root), files_of(other)
    assert set(a) != set(b)  # other pids, cameras and frame numbers
    images_a = {v for k, v in a.items() if k.endswith(".jpg")}
    images_b = {v for k, v in b.items() if k.endswith(".jpg")}
    assert images_a.isdisjoint(images_b)


def test_layout_naming_and_counts(tiny) -> None:
    root, info = tiny
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        names = [p.name for p in (root / folder).iterdir()]
        assert names and all(NAME.match(n) for n in names), names[:3]
    df, report = build_manifest_with_report(root)  # header check on every image
    assert report.layout == "market1501"
    assert report.num_skipped == 0 and report.bad_images == []
    assert report.warnings == []  # every query has a cross-camera gallery match, ...
    assert report.junk_by_split == {"gallery": info.num_junk} and info.num_junk > 0
    summary = summarize_manifest(df)
    assert summary.loc["train", "images"] == info.num_images["train"]
    assert summary.loc["query", "images"] == info.num_images["query"]
    assert summary.loc["gallery", "images"] == info.num_images["gallery"] - info.num_junk
    for split in ("train", "query", "gallery"):
        assert summary.loc[split, "identities"] == info.num_identities[split]
    assert summary.loc["train", "identities"] == len(info.train_pids) == TINY["num_ids"] // 2
    assert summary.loc["query", "identities"] == len(info.test_pids)
    assert summary.loc["gallery", "identities"] == len(info.test_pids) + 1  # + distractor pid 0
    assert (df["pid"] == 0).sum() == info.num_distractors > 0
    assert set(df.loc[df["pid"] == 0, "split"]) == {"gallery"}
    # train and test identities are disjoint; each test id is queried from >= 2 cameras, once each
    assert set(info.train_pids).isdisjoint(info.test_pids)
    query = df[df["split"] == "query"]
    per_id = query.groupby("pid")["camid"].agg(["count", "nunique"])
    assert (per_id["nunique"] >= 2).all() and (per_id["count"] == per_id["nunique"]).all()
    assert set(df.loc[df["split"] == "train", "pid"]) == set(info.train_pids)
    # image size and format
    with Image.open(root / df.loc[0, "path"]) as img:
        assert img.size == (64, 128) and img.format == "JPEG"
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["train_pids"] == info.train_pids and meta["seed"] == 0


def test_custom_size_and_cameras(tmp_path: Path) -> None:
    info = generate_synthetic_dataset(tmp_path / "d", num_ids=6, images_per_id=4, num_cameras=3,
                                      height=64, width=32, seed=3, num_distractors=2, num_junk=1)
    df, report = build_manifest_with_report(tmp_path / "d")
    assert sorted(df["camid"].unique()) == [0, 1, 2]
    assert info.num_distractors == 2 and report.num_junk == 1
    with Image.open(tmp_path / "d" / df.loc[len(df) - 1, "path"]) as img:
        assert img.size == (32, 64)


def test_more_training_than_test_identities(tmp_path: Path) -> None:
    info = generate_synthetic_dataset(tmp_path / "d", num_ids=10, images_per_id=4, seed=3, num_test_ids=3)
    assert len(info.train_pids) == 7 and len(info.test_pids) == 3
    assert info.num_identities["query"] == 3 and info.parameters["num_test_ids"] == 3
    df, _ = build_manifest_with_report(tmp_path / "d")
    assert df[df.split == "train"].pid.nunique() == 7
    assert set(df[df.split == "query"].pid) == set(info.test_pids)
    default = generate_synthetic_dataset(tmp_path / "e", num_ids=10, images_per_id=4, seed=3)
    assert len(default.test_pids) == 5 and "num_test_ids" not in default.parameters  # halves, as before
    with pytest.raises(ValueError, match="num_test_ids must be between 1 and num_ids - 1 = 9, got 10"):
        generate_synthetic_dataset(tmp_path / "f", num_ids=10, num_test_ids=10)
    assert main([str(tmp_path / "g"), "--ids", "6", "--test-ids", "2", "--images-per-id", "4"]) == 0
    assert json.loads((tmp_path / "g" / "synthetic.json").read_text())["num_identities"]["query"] == 2


def test_existing_output_and_overwrite(tiny, tmp_path: Path) -> None:
    root, _ = tiny
    out = tmp_path / "ds"
    generate_synthetic_dataset(out, seed=0, **TINY)
    keep = out / "notes.md"
    keep.write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_synthetic_dataset(out, seed=0, **TINY)
    generate_synthetic_dataset(out, seed=0, overwrite=True, **TINY)
    assert keep.read_text() == "mine"
    copy = files_of(out)
    copy.pop("notes.md")
    assert copy == files_of(root)
    assert not list(tmp_path.glob(".ds.tmp-*"))


def test_skip_existing_reuses_only_the_same_complete_dataset(tmp_path: Path) -> None:
    out = tmp_path / "embedded"
    args = {"num_ids": 4, "images_per_id": 4, "seed": 7}
    first = generate_synthetic_dataset(out, **args)
    assert not first.reused
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    again = generate_synthetic_dataset(out, skip_existing=True, **args)
    assert again.reused and again.num_images == first.num_images
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == before
    with pytest.raises(FileExistsError, match="other arguments"):
        generate_synthetic_dataset(out, skip_existing=True, **{**args, "seed": 8})
    next(iter(before)).unlink()  # incomplete: regenerated when overwriting is allowed
    fixed = generate_synthetic_dataset(out, skip_existing=True, overwrite=True, **args)
    assert not fixed.reused
    assert sorted(p.name for p in out.rglob("*.jpg")) == sorted(p.name for p in before)
    assert main([str(out), "--ids", "4", "--images-per-id", "4", "--seed", "7",
                 "--skip-existing"]) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_ids": 1}, "num_ids"), ({"images_per_id": 3}, "images_per_id"),
     ({"num_cameras": 1}, "num_cameras"), ({"num_cameras": 10}, "num_cameras"),
     ({"height": 8}, "image size"), ({"num_junk": -1}, "num_junk"), ({"workers": 0}, "workers")],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_synthetic_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert main([str(out), "--ids", "4", "--images-per-id", "4", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    assert "bounding_box_train/" in printed and "distractors" in printed
    assert main([str(out), "--ids", "4", "--images-per-id", "4"]) == 2  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    assert main([str(out), "--size", "tiny", "--overwrite"]) == 0


def test_cli_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "mod"
    proc = subprocess.run(
        [sys.executable, "-m", "reid_pipeline.embedded.synthetic", str(out), "--ids", "4",
         "--images-per-id", "4", "--cameras", "2", "--seed", "2"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    assert (out / "query").is_dir() and any((out / "query").iterdir())


def _stripe_histograms(root: Path, paths: list[str], centre: bool) -> np.ndarray:
    feats = []
    for p in paths:
        arr = np.asarray(Image.open(root / p).convert("RGB"))
        if centre:
            arr = arr[10:122, 22:42]
        parts = []
        for part in np.array_split(arr, 4, axis=0):
            q = (part // 32).astype(np.int64).reshape(-1, 3)
            h = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512).astype(float)
            parts.append(np.sqrt(h / h.sum()))
        feats.append(np.concatenate(parts))
    return np.stack(feats)


def _rank1(df, q_feat: np.ndarray, g_feat: np.ndarray) -> float:
    q = df[df["split"] == "query"]
    g = df[df["split"] == "gallery"]
    dist = ((q_feat[:, None] - g_feat[None]) ** 2).sum(-1)
    hits = []
    for i, (pid, cam) in enumerate(zip(q["pid"], q["camid"])):
        keep = ~((g["pid"].to_numpy() == pid) & (g["camid"].to_numpy() == cam))
        order = np.argsort(dist[i][keep], kind="stable")
        hits.append(g["pid"].to_numpy()[keep][order[0]] == pid)
    return float(np.mean(hits))


def test_default_dataset_is_learnable_but_not_trivial(tmp_path: Path) -> None:
    """Colour histograms of the person region find the right person far above chance, while
    whole-image histograms (dominated by each camera's scene and lighting) almost never do."""
    root = tmp_path / "small"
    info = generate_synthetic_dataset(root, seed=0)  # the default size used by the demo
    assert info.num_images["train"] >= 250 and len(info.test_pids) == 40
    df, _ = build_manifest_with_report(root)
    q = df.loc[df["split"] == "query", "path"].tolist()
    g = df.loc[df["split"] == "gallery", "path"].tolist()
    chance = 1 / len(info.test_pids)
    person = _rank1(df, _stripe_histograms(root, q, True), _stripe_histograms(root, g, True))
    whole = _rank1(df, _stripe_histograms(root, q, False), _stripe_histograms(root, g, False))
    assert person > 4 * chance
    assert person < 0.5
    assert whole < 0.1
    fp = manifest_fingerprint(df, root)
    assert len(fp) == 64
