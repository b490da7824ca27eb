"""Layout parsers on fixture trees that follow the real naming rules of each dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from reid_pipeline.data import (
    LAYOUTS,
    DatasetLayoutError,
    build_manifest,
    build_manifest_with_report,
    summarize_manifest,
)
from reid_pipeline.data.layouts import detect_layout


def touch(path: Path, data: bytes = b"") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_tree(base: Path, files: dict[str, list[str]]) -> None:
    for folder, names in files.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            touch(base / folder / name)


# A small Market-1501 tree with the real naming: junk (-1) and distractors (0000) only in the
# gallery (bounding_box_test), as in the released set, plus the usual clutter.
MARKET_SMALL = {
    "bounding_box_train": [
        "0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c2s3_070952_01.jpg",
        "0007_c3s3_071002_02.jpg", "0010_c6s4_002427_02.jpg", "0010_c1s1_001051_01.jpg",
        "Thumbs.db",
    ],
    "query": [
        "0001_c1s1_001051_00.jpg", "0001_c3s1_001176_00.jpg", "0003_c4s6_015641_00.jpg",
        "0003_c6s1_012271_00.jpg", "foo.jpg",
    ],
    "bounding_box_test": [
        "0001_c2s1_000301_01.jpg", "0001_c5s1_000676_04.jpg", "0003_c1s1_000076_01.jpg",
        "0003_c2s1_000151_04.jpg", "0000_c1s1_000151_03.jpg", "0000_c3s2_000501_02.jpg",
        "0000_c6s3_088662_01.jpg", "-1_c1s1_000401_03.jpg", "-1_c3s1_016551_03.jpg",
        "-1_c5s2_008427_01.jpg", "readme.txt",
    ],
    "gt_bbox": ["0001_c1s1_001051_00.jpg"],  # present in the real set, not a split
}


@pytest.mark.parametrize("parent", ["", "Market-1501-v15.09.15"])
def test_market_small_tree(tmp_path: Path, parent: str) -> None:
    base = tmp_path / parent if parent else tmp_path
    write_tree(base, MARKET_SMALL)
    (base / "bounding_box_test" / "extra").mkdir()

    df, report = build_manifest_with_report(tmp_path, check_images=False)

    assert report.layout == "market1501"
    assert report.dataset_dir == (parent or ".")
    prefix = f"{parent}/" if parent else ""
    assert df["path"].str.startswith(prefix).all()
    assert (prefix + "bounding_box_train/0002_c1s1_000451_03.jpg") in set(df["path"])
    summary = summarize_manifest(df)
    assert summary.loc["train"].tolist() == [6, 3, 4]
    assert summary.loc["query"].tolist() == [4, 2, 4]
    assert summary.loc["gallery"].tolist() == [7, 3, 5]  # 4 real + 3 distractors; ids 0, 1, 3
    # junk dropped, and only the gallery holds it (as in the real Market-1501)
    assert report.num_junk == 3
    assert report.junk_by_split == {"gallery": 3}
    assert not (df["pid"] == -1).any()
    # distractors kept in the gallery only
    assert set(df.loc[df["pid"] == 0, "split"]) == {"gallery"}
    assert (df["pid"] == 0).sum() == 3
    # Thumbs.db, foo.jpg, readme.txt and the sub-folder are skipped and counted
    assert report.num_skipped == 4
    joined = " ".join(report.skipped_examples)
    for name in ("Thumbs.db", "foo.jpg", "readme.txt", "extra/"):
        assert name in joined
    # cameras 1..6 -> 0..5, labels contiguous over train pids in sorted order
    assert df["camid"].between(0, 5).all()
    row = df[df["path"].str.endswith("0010_c6s4_002427_02.jpg")].iloc[0]
    assert (row["pid"], row["camid"], row["split"], row["label"]) == (10, 5, "train", 2)
    train = df[df["split"] == "train"]
    assert dict(zip(train["pid"], train["label"])) == {2: 0, 7: 1, 10: 2}
    assert (df.loc[df["split"] != "train", "label"] == -1).all()


def _counts(total: int, n: int) -> list[int]:
    base = np.full(n, total // n)
    base[: total - base.sum()] += 1
    return base.tolist()


def _write_split(folder: Path, pids: list[int], counts: list[int], num_cams: int,
                 name_fmt: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    k = 0
    for i, (pid, count) in enumerate(zip(pids, counts)):
        for j in range(count):
            cam = (i + j) % num_cams + 1
            tag = "-1" if pid == -1 else f"{pid:04d}"
            (folder / name_fmt.format(pid=tag, cam=cam, k=k)).touch()
            k += 1


@pytest.fixture(scope="module")
def market_full(tmp_path_factory) -> Path:
    """Zero-byte files with the size of the released Market-1501 (issue's reference counts)."""
    root = tmp_path_factory.mktemp("market") / "Market-1501-v15.09.15"
    rng = np.random.default_rng(0)
    pids = rng.permutation(np.arange(1, 1502))
    train, test = sorted(pids[:751].tolist()), sorted(pids[751:].tolist())
    fmt = "{pid}_c{cam}s1_{k:06d}_01.jpg"
    _write_split(root / "bounding_box_train", train, _counts(12936, 751), 6, fmt)
    _write_split(root / "query", test, _counts(3368, 750), 6, fmt)
    # gallery: 13120 images of the 750 test ids, 2793 distractors (0000), 3819 junk (-1)
    _write_split(root / "bounding_box_test", test + [0, -1],
                 _counts(15913 - 2793, 750) + [2793, 3819], 6, fmt)
    return root.parent


def test_market_reference_counts(market_full: Path) -> None:
    df, report = build_manifest_with_report(market_full, check_images=False)
    assert report.layout == "market1501"
    summary = summarize_manifest(df)
    assert summary.loc["train"].tolist() == [12936, 751, 6]
    assert summary.loc["query"].tolist() == [3368, 750, 6]
    assert summary.loc["gallery"].tolist() == [15913, 751, 6]
    assert report.junk_by_split == {"gallery": 3819}
    assert df["label"].max() == 750
    assert report.warnings == []


@pytest.fixture(scope="module")
def duke_full(tmp_path_factory) -> Path:
    """Zero-byte files with the size of DukeMTMC-reID, in a folder *not* named like it."""
    root = tmp_path_factory.mktemp("duke") / "my_copy"
    rng = np.random.default_rng(1)
    pids = rng.permutation(np.arange(1, 7141))[:1404 + 408]
    train = sorted(pids[:702].tolist())
    test = sorted(pids[702:1404].tolist())
    extra = sorted(pids[1404:].tolist())  # gallery-only distractor identities
    fmt = "{pid}_c{cam}_f{k:07d}.jpg"
    _write_split(root / "bounding_box_train", train, _counts(16522, 702), 8, fmt)
    _write_split(root / "query", test, _counts(2228, 702), 8, fmt)
    gallery_ids = sorted(test + extra)
    _write_split(root / "bounding_box_test", gallery_ids, _counts(17661, 1110), 8, fmt)
    return root


def test_duke_reference_counts_detected_by_camera_range(duke_full: Path) -> None:
    df, report = build_manifest_with_report(duke_full, check_images=False)
    assert report.layout == "dukemtmc"
    summary = summarize_manifest(df)
    assert summary.loc["train"].tolist() == [16522, 702, 8]
    assert summary.loc["query"].tolist() == [2228, 702, 8]
    assert summary.loc["gallery"].tolist() == [17661, 1110, 8]
    assert df["camid"].max() == 7
    assert report.num_skipped == 0


def test_duke_detected_by_folder_name(tmp_path: Path) -> None:
    base = tmp_path / "DukeMTMC-reID"
    write_tree(base, {
        "bounding_box_train": ["0001_c2_f0046182.jpg", "0001_c5_f0051341.jpg"],
        "query": ["0005_c2_f0046985.jpg"],
        "bounding_box_test": ["0005_c1_f0045012.jpg", "0005_c3_f0047112.jpg",
                              "0005_c9_f0047112.jpg"],
    })
    df, report = build_manifest_with_report(tmp_path, check_images=False)
    assert report.layout == "dukemtmc"
    assert report.dataset_dir == "DukeMTMC-reID"
    assert report.num_skipped == 1 and "c9" in report.skipped_examples[0]
    assert sorted(df["camid"]) == [0, 1, 1, 2, 4]
    assert any("single camera" in w and "query" in w for w in report.warnings)


def test_explicit_layout_overrides_detection(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "bounding_box_train": ["0001_c1s1_000001_01.jpg", "0001_c7s1_000002_01.jpg"],
        "query": ["0002_c1s1_000003_01.jpg"],
        "bounding_box_test": ["0002_c2s1_000004_01.jpg"],
    })
    assert build_manifest_with_report(tmp_path, check_images=False)[1].layout == "dukemtmc"
    df, report = build_manifest_with_report(tmp_path, layout="market1501", check_images=False)
    assert report.layout == "market1501"
    assert len(df) == 3
    assert report.num_skipped == 1 and "camera c7 outside 1..6" in report.skipped_examples[0]
    df2, report2 = build_manifest_with_report(tmp_path, layout="market_style", check_images=False)
    assert report2.layout == "market_style" and len(df2) == 4


def _msmt_tree(base: Path, train_dir: str, test_dir: str) -> None:
    train = {
        "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0",
                           "0000/0000_001_05_0303morning_0016_1.jpg 0",
                           "0001/0001_000_15_0303noon_0201_0.jpg 1"],
        "list_val.txt": ["0001/0001_001_03_0303noon_0230_2.jpg 1",
                         "0002/0002_000_07_0304afternoon_0011_0.jpg 2"],
    }
    test = {
        "list_query.txt": ["0000/0000_000_02_0113morning_0012_0.jpg 0",
                           "0001/0001_000_09_0113noon_0801_0.jpg 1"],
        "list_gallery.txt": ["0000/0000_001_04_0113morning_0099_1.jpg 0",
                             "0001/0001_002_11_0113noon_0920_3.jpg 1",
                             "", "garbage", "0001/x.jpg notanint", "0001/0001_000.jpg 1"],
    }
    for lists, image_dir in ((train, train_dir), (test, test_dir)):
        for list_name, lines in lists.items():
            touch(base / list_name, ("\n".join(lines) + "\n").encode())
            for line in lines:
                parts = line.split()
                if len(parts) == 2:
                    touch(base / image_dir / parts[0])


@pytest.mark.parametrize(
    "folder, train_dir, test_dir",
    [("MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
     ("MSMT17", "train", "test")],
)
def test_msmt17_versions(tmp_path: Path, folder: str, train_dir: str, test_dir: str) -> None:
    _msmt_tree(tmp_path / folder, train_dir, test_dir)
    df, report = build_manifest_with_report(tmp_path, check_images=False)
    assert report.layout == "msmt17"
    assert report.dataset_dir == folder
    summary = summarize_manifest(df)
    assert summary.loc["train"].tolist() == [5, 3, 5]  # train + val merged
    assert summary.loc["query"].tolist() == [2, 2, 2]
    assert summary.loc["gallery"].tolist() == [2, 2, 2]
    row = df[df["path"].str.endswith("0001_000_15_0303noon_0201_0.jpg")].iloc[0]
    assert row["path"] == f"{folder}/{train_dir}/0001/0001_000_15_0303noon_0201_0.jpg"
    assert (row["pid"], row["camid"], row["label"]) == (1, 14, 1)
    assert sorted(df.loc[df["split"] == "query", "camid"]) == [1, 8]
    assert report.num_skipped == 3  # 'garbage', a non-integer pid, a name without camera field
    # query/gallery pids restart at 0 in MSMT17: no overlap warning for this layout
    assert not any("both train" in w for w in report.warnings)


def test_msmt17_explicit_on_dataset_folder(tmp_path: Path) -> None:
    _msmt_tree(tmp_path, "train", "test")
    df = build_manifest(tmp_path, layout="msmt17", check_images=False)
    assert len(df) == 9
    assert df.attrs["report"]["dataset_dir"] == "."


def test_msmt17_missing_listed_file_is_reported(tmp_path: Path) -> None:
    from reid_pipeline.data import BadImageError

    _msmt_tree(tmp_path, "train", "test")
    (tmp_path / "test" / "0001" / "0001_000_09_0113noon_0801_0.jpg").unlink()
    with pytest.raises(BadImageError, match="file not found"):
        build_manifest(tmp_path, check_images=True, on_bad_image="error")


def test_market_style_own_data(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "train": ["0007_c12_frame3.jpg", "0007_c1_frame9.png", "0042_c3_a.jpg"],
        "query": ["0100_c2_x.jpg"],
        "gallery": ["0100_c11_y.jpg", "0000_c4_z.jpg", "-1_c4_junk.jpg", "IMG_0001.jpg"],
    })
    df, report = build_manifest_with_report(tmp_path, check_images=False)
    assert report.layout == "market_style"
    assert sorted(df["camid"]) == [0, 1, 2, 3, 10, 11]
    assert report.num_junk == 1 and report.num_skipped == 1
    assert list(df.loc[df["split"] == "train", "label"]) == [0, 0, 1]


def test_market_folders_with_many_cameras_fall_back_to_market_style(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "bounding_box_train": ["0001_c9s1_000001_01.jpg"],
        "query": ["0002_c1s1_000001_01.jpg"],
        "bounding_box_test": ["0002_c2s1_000001_01.jpg"],
    })
    assert detect_layout(tmp_path)[0].name == "market_style"


def test_unrecognised_tree_lists_every_layout(tmp_path: Path) -> None:
    write_tree(tmp_path, {"images": ["0001_c1s1_000001_01.jpg"], "train": ["x.jpg"]})
    with pytest.raises(DatasetLayoutError) as info:
        build_manifest(tmp_path, check_images=False)
    message = str(info.value)
    for name, lay in LAYOUTS.items():
        assert name in message and lay.expects in message
    assert "bounding_box_train" in message and "list_train.txt" in message
    assert "images/" in message  # what was found


def test_explicit_layout_that_does_not_match(tmp_path: Path) -> None:
    write_tree(tmp_path, MARKET_SMALL)
    with pytest.raises(DatasetLayoutError, match="requested layout 'msmt17'.*list_train.txt"):
        build_manifest(tmp_path, layout="msmt17", check_images=False)
    with pytest.raises(DatasetLayoutError, match="unknown dataset layout 'cuhk03'"):
        build_manifest(tmp_path, layout="cuhk03", check_images=False)


def test_missing_empty_and_file_roots(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_manifest(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetLayoutError, match="empty"):
        build_manifest(empty)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(NotADirectoryError, match="file.txt"):
        build_manifest(afile)


def test_nothing_parses_is_an_error(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "bounding_box_train": ["foo.jpg", "Thumbs.db"],
        "query": ["bar.jpg"],
        "bounding_box_test": ["-1_c1s1_000001_01.jpg"],
    })
    with pytest.raises(DatasetLayoutError, match="could be parsed.*3 entries skipped, 1 junk"):
        build_manifest(tmp_path, check_images=False)
