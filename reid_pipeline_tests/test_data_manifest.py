"""Manifest building, the cheap image check, warnings, summaries and fingerprints."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reid_pipeline.data import (
    MANIFEST_COLUMNS,
    BadImageError,
    ManifestReport,
    build_manifest,
    build_manifest_with_report,
    check_image_file,
    directory_fingerprint,
    manifest_fingerprint,
    summarize_manifest,
)


def image_bytes(fmt: str = "JPEG", seed: int = 0, size: tuple[int, int] = (16, 32)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_market(root: Path, names: dict[str, list[str]], fmt: str = "JPEG") -> None:
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(files):
            (root / folder / name).write_bytes(image_bytes(fmt, seed=i))


SMALL = {
    "bounding_box_train": ["0009_c2s1_000100_01.jpg", "0003_c1s1_000200_01.jpg",
                           "0003_c4s1_000300_01.jpg", "0120_c5s2_000400_02.jpg"],
    "query": ["0004_c1s1_000500_00.jpg", "0011_c3s1_000600_00.jpg"],
    "bounding_box_test": ["0004_c2s1_000700_01.jpg", "0011_c6s1_000800_01.jpg",
                          "0000_c3s1_000900_01.jpg", "-1_c1s1_001000_01.jpg"],
}


@pytest.fixture()
def small_root(tmp_path: Path) -> Path:
    root = tmp_path / "market"
    write_market(root, SMALL)
    return root


def test_manifest_columns_dtypes_order_labels(small_root: Path) -> None:
    df = build_manifest(small_root)
    assert tuple(df.columns) == MANIFEST_COLUMNS
    for col in ("pid", "camid", "label"):
        assert df[col].dtype == np.int64
    assert list(df.index) == list(range(len(df)))
    assert list(df["split"]) == ["train"] * 4 + ["query"] * 2 + ["gallery"] * 3
    for split in ("train", "query", "gallery"):  # sorted by path within a split
        paths = df.loc[df["split"] == split, "path"].tolist()
        assert paths == sorted(paths)
    train = df[df["split"] == "train"]
    assert dict(zip(train["pid"], train["label"])) == {3: 0, 9: 1, 120: 2}
    assert (df.loc[df["split"] != "train", "label"] == -1).all()
    assert not df["path"].str.contains("\\\\").any() and not df["path"].str.startswith("/").any()
    report = df.attrs["report"]
    assert report["layout"] == "market1501" and report["num_junk"] == 1
    assert report["images_checked"] is True
    # rebuilding gives exactly the same frame
    pd.testing.assert_frame_equal(df, build_manifest(small_root))


def test_report_object_and_summary(small_root: Path) -> None:
    df, report = build_manifest_with_report(small_root)
    assert isinstance(report, ManifestReport)
    assert report.num_images == {"train": 4, "query": 2, "gallery": 3}
    assert report.to_dict()["junk_by_split"] == {"gallery": 1}
    summary = summarize_manifest(df)
    assert list(summary.index) == ["train", "query", "gallery"]
    assert list(summary.columns) == ["images", "identities", "cameras"]
    assert summary.loc["gallery"].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="missing columns"):
        summarize_manifest(df.drop(columns="camid"))


def test_truncated_jpeg_is_found_and_listed(small_root: Path) -> None:
    victim = small_root / "query" / "0011_c3s1_000600_00.jpg"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    empty = small_root / "bounding_box_test" / "0004_c2s1_000700_01.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError) as info:
        build_manifest(small_root)
    err = info.value
    assert len(err.paths) == 2
    assert "query/0011_c3s1_000600_00.jpg" in str(err) and "truncated JPEG" in str(err)
    assert "empty file" in str(err)

    df, report = build_manifest_with_report(small_root, on_bad_image="skip")
    assert report.bad_images == ["bounding_box_test/0004_c2s1_000700_01.jpg",
                                 "query/0011_c3s1_000600_00.jpg"]
    assert "truncated JPEG" in report.bad_image_reasons["query/0011_c3s1_000600_00.jpg"]
    assert not df["path"].isin(report.bad_images).any()
    assert len(df) == 7
    assert any("unreadable or truncated" in w for w in report.warnings)
    # trusting the names alone keeps them
    assert len(build_manifest(small_root, check_images=False)) == 9


def test_on_bad_image_value_is_checked(small_root: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_image"):
        build_manifest(small_root, on_bad_image="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP"])
def test_check_image_file_formats(tmp_path: Path, fmt: str) -> None:
    good = tmp_path / f"good.{fmt.lower()}"
    data = image_bytes(fmt)
    good.write_bytes(data)
    assert check_image_file(good) is None
    assert check_image_file(good, read_size=False) is None
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) - 40])
    reason = check_image_file(cut)
    assert reason is not None and "truncated" in reason


def test_check_image_file_other_failures(tmp_path: Path) -> None:
    text = tmp_path / "text.jpg"
    text.write_text("not an image at all")
    assert "not a JPEG" in check_image_file(text)  # type: ignore[operator]
    assert check_image_file(tmp_path / "missing.jpg") == "file not found"
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(image_bytes() + b"\x00" * 10)  # trailing zeros after EOI are tolerated
    assert check_image_file(padded) is None
    # valid markers but a corrupt header: caught by the PIL header read
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 200 + b"\xff\xd9")
    assert check_image_file(fake, read_size=False) is None
    assert "cannot be parsed" in check_image_file(fake)  # type: ignore[operator]


def test_truncated_png_in_own_data(tmp_path: Path) -> None:
    write_market(tmp_path, {"train": ["0001_c1_a.png", "0001_c2_b.png"], "query": ["0002_c1_a.png"],
                            "gallery": ["0002_c2_b.png"]}, fmt="PNG")
    victim = tmp_path / "gallery" / "0002_c2_b.png"
    victim.write_bytes(victim.read_bytes()[:-20])
    with pytest.raises(BadImageError, match="truncated PNG"):
        build_manifest(tmp_path)


def test_single_camera_split_warns(tmp_path: Path) -> None:
    write_market(tmp_path, {
        "bounding_box_train": ["0001_c1s1_000001_01.jpg", "0001_c2s1_000002_01.jpg"],
        "query": ["0002_c1s1_000003_01.jpg", "0003_c1s1_000004_01.jpg"],
        "bounding_box_test": ["0002_c1s1_000005_01.jpg", "0003_c1s1_000006_01.jpg"],
    })
    df, report = build_manifest_with_report(tmp_path)
    single = [w for w in report.warnings if "single camera" in w]
    assert len(single) == 2
    assert all("Market protocol would discard every same-camera match" in w for w in single)
    assert any("no gallery image from another camera" in w for w in report.warnings)
    assert df.attrs == {}  # the tuple API leaves attrs alone


def test_overlapping_ids_and_distractor_query_warn(tmp_path: Path) -> None:
    write_market(tmp_path, {
        "bounding_box_train": ["0001_c1s1_000001_01.jpg", "0002_c2s1_000002_01.jpg"],
        "query": ["0002_c1s1_000003_01.jpg", "0000_c2s1_000003_01.jpg"],
        "bounding_box_test": ["0002_c2s1_000005_01.jpg", "0000_c1s1_000006_01.jpg"],
    })
    _, report = build_manifest_with_report(tmp_path)
    assert any("both train and query/gallery" in w for w in report.warnings)
    assert any("distractor images (pid 0) outside the gallery" in w for w in report.warnings)


# ---------------------------------------------------------------------------------------------
# fingerprints
# ---------------------------------------------------------------------------------------------
def test_fingerprints_stable_and_content_sensitive(small_root: Path) -> None:
    df = build_manifest(small_root)
    fp = manifest_fingerprint(df, small_root)
    dfp = directory_fingerprint(small_root)
    assert len(fp) == 64 and set(fp) <= set("0123456789abcdef") and fp != dfp
    assert manifest_fingerprint(df.iloc[1:], small_root) != fp  # one row fewer: another fingerprint
    assert manifest_fingerprint(build_manifest(small_root), small_root) == fp
    assert manifest_fingerprint(df, small_root, workers=4) == fp
    assert directory_fingerprint(small_root) == dfp

    # touching mtimes: the observation fingerprint changes, the content fingerprint does not
    victim = small_root / "query" / "0004_c1s1_000500_00.jpg"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert directory_fingerprint(small_root) != dfp
    assert manifest_fingerprint(build_manifest(small_root), small_root) == fp

    # different bytes under the same name: content fingerprint changes
    victim.write_bytes(image_bytes(seed=99))
    fp2 = manifest_fingerprint(build_manifest(small_root), small_root)
    assert fp2 != fp

    # relabelling (a rename changes the pid) changes it too
    victim.rename(victim.with_name("0011_c1s1_000500_00.jpg"))
    fp3 = manifest_fingerprint(build_manifest(small_root), small_root)
    assert fp3 not in (fp, fp2)

    # the same manifest with another label is another fingerprint
    df3 = build_manifest(small_root)
    df3.loc[0, "label"] = 7
    assert manifest_fingerprint(df3, small_root) != fp3


def test_fingerprint_of_a_copy_is_identical(small_root: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(small_root, copy)  # new mtimes, same bytes
    fp = manifest_fingerprint(build_manifest(small_root), small_root)
    assert manifest_fingerprint(build_manifest(copy), copy) == fp


def test_fingerprint_errors(small_root: Path, tmp_path: Path) -> None:
    df = build_manifest(small_root)
    (small_root / df.loc[0, "path"]).unlink()
    with pytest.raises(FileNotFoundError, match=str(df.loc[0, "path"])):
        manifest_fingerprint(df, small_root)
    with pytest.raises(ValueError, match="missing columns"):
        manifest_fingerprint(df.drop(columns="label"), small_root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        directory_fingerprint(tmp_path / "nowhere")
