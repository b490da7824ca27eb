"""Faults, load and hostile input at the library level (issue 10).

Each test builds the faulty input (a full tmpfs, a symlink loop, a link to /etc/passwd, a 16-bit PNG,
a decompression bomb, an 8000×8000 photo, a truncated checkpoint, odd feature arrays), reproduces
what used to go wrong, and checks the clear outcome instead.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_pipeline import storage
from reid_pipeline.data import cache as cache_mod
from reid_pipeline.data.cache import ImageCache, ImageDecodeError, decode_image, plan_image_cache
from reid_pipeline.data.fingerprint import WalkReport, directory_fingerprint
from reid_pipeline.data.layouts import DatasetLayoutError
from reid_pipeline.data.manifest import build_manifest_with_report
from reid_pipeline.data.validation import BadImageError, check_image_file
from reid_pipeline.evaluation.distance import pairwise_distance
from reid_pipeline.evaluation.metrics import evaluate_rank
from reid_pipeline.evaluation.rerank import re_ranking
from reid_pipeline.model.clip_loader import (
    ClipWeightsError,
    _clean_message,
    cached_weights_path,
    load_clip,
    resolve_clip_source,
)
from reid_pipeline.storage import StorageFullError, atomic_write_bytes, save_tensors

pytestmark = pytest.mark.faults

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


def _market(root: Path, pids=(1, 2), cams=(1, 2)) -> Path:
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True)
        for pid in pids:
            for cam in cams:
                Image.new("RGB", (64, 128), (pid * 50, cam * 40, 7)).save(
                    root / split / f"{pid:04d}_c{cam}s1_000001_01.jpg"
                )
    return root


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, side: int = 30000) -> Path:
    """A valid 1-bit grayscale PNG of side×side pixels that compresses to ~100 KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body)
                     + _png_chunk(b"IEND", b""))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A real 3 MiB tmpfs (root only); unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _source_images(folder: Path, n: int = 40, size=(128, 256)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rels = []
    for i in range(n):
        name = f"{i:04d}_c1s1_000001_01.jpg"
        Image.new("RGB", size, (i, 2 * i, 3 * i)).save(folder / name)
        rels.append(name)
    return rels


_CACHE_ON_FULL_DISK = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from reid_pipeline.data import cache as cache_mod
    if {disable_check!r}:
        cache_mod.check_free_space = lambda *a, **k: None   # as if statvfs could not tell
    try:
        cache_mod.ImageCache.from_paths({src!r}, {rels!r}, mode="disk", cache_dir={cache_dir!r}, num_threads=2)
        print(json.dumps({{"ok": True}}))
    except OSError as exc:
        print(json.dumps({{"ok": False, "type": type(exc).__name__, "errno": exc.errno, "msg": str(exc)}}))
    """
)


# ---------------------------------------------------------------------------------------------
# 3. disk full, temp files, umask


@pytest.mark.parametrize("disable_check", [False, True], ids=["space-check", "fallocate"])
def test_disk_cache_on_full_tmpfs_names_the_file_and_leaves_nothing(small_tmpfs, tmp_path, disable_check):
    """Before: SIGBUS (exit -7) while the memmap was written, no path named, a 3.8 MB hidden
    ``.u8.tmp`` left that kept the volume full."""
    src = tmp_path / "src"
    rels = _source_images(src)  # 40 × 3×256×128 = 3.9 MB > 3 MiB
    cache_dir = small_tmpfs / "cache"
    script = _CACHE_ON_FULL_DISK.format(root=str(PROJECT_ROOT), disable_check=disable_check, src=str(src),
                                        rels=rels, cache_dir=str(cache_dir))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the cache build died (signal {-proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is False
    assert result["type"] == "StorageFullError" and result["errno"] == errno.ENOSPC
    assert str(cache_dir / "images-") in result["msg"] and ".u8" in result["msg"]
    assert "no space left" in result["msg"] and "needs 3.8 MiB" in result["msg"]
    assert _listing(cache_dir) == []  # no temp file, no half cache
    st = os.statvfs(small_tmpfs)
    assert st.f_bavail == st.f_blocks  # the volume is empty again


def test_disk_cache_fits_on_tmpfs_and_follows_umask(small_tmpfs, tmp_path):
    src = tmp_path / "src"
    rels = _source_images(src, n=10)  # 0.98 MB
    old = os.umask(0o027)
    try:
        cache = ImageCache.from_paths(src, rels, mode="disk", cache_dir=small_tmpfs / "c", num_threads=1)
    finally:
        os.umask(old)
    assert len(cache) == 10 and cache.path is not None
    ref = ImageCache.from_paths(src, rels)
    assert torch.equal(cache.batch(range(10)), ref.batch(range(10)))
    for f in (cache.path, cache.path.with_suffix(".json")):
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f
    assert not [n for n in _listing(small_tmpfs / "c") if n.startswith(".")]


def test_disk_cache_index_failure_removes_the_data_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    rels = _source_images(src, n=3)

    def full(path, obj):
        raise storage.no_space_error(path, 1000)

    monkeypatch.setattr(cache_mod, "write_json", full)
    with pytest.raises(StorageFullError, match=r"images-.*\.json: no space left"):
        ImageCache.from_paths(src, rels, mode="disk", cache_dir=tmp_path / "c")
    assert _listing(tmp_path / "c") == []


def test_atomic_write_on_full_tmpfs(small_tmpfs, monkeypatch):
    target = small_tmpfs / "weights.safetensors"
    atomic_write_bytes(target, b"old")
    with pytest.raises(StorageFullError, match=rf"{target}: no space left .*needs 4.0 MiB"):
        atomic_write_bytes(target, b"\0" * (4 << 20))
    # Without the free-space check the write itself hits ENOSPC: same error, nothing left behind.
    monkeypatch.setattr(storage, "_CHECK_SPACE_FROM", 1 << 40)
    with pytest.raises(StorageFullError, match=rf"{target}: no space left") as info:
        atomic_write_bytes(target, b"\0" * (4 << 20))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert _listing(small_tmpfs) == ["weights.safetensors"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artefacts_follow_the_umask(tmp_path, umask, mode):
    """Before: every artefact was 0600 (tempfile.mkstemp), whatever the umask."""
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        save_tensors(tmp_path / "t.safetensors", {"w": torch.zeros(2)}, {"k": 1})
    finally:
        os.umask(old)
    for name in ("a.bin", "t.safetensors", "t.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_atomic_write_failure_leaves_no_temp_file(tmp_path, monkeypatch):
    def boom(src, dst):
        raise PermissionError(errno.EACCES, "replace refused")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(PermissionError):
        atomic_write_bytes(tmp_path / "x.json", b"{}")
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 4. symlinks


def test_symlink_loop_does_not_break_fingerprint_or_manifest(tmp_path):
    """Before: directory_fingerprint raised ELOOP with a path of > 1000 characters."""
    looped = _market(tmp_path / "looped")
    without_links = directory_fingerprint(looped)
    os.symlink(".", looped / "bounding_box_train" / "again")
    os.symlink("..", looped / "query" / "up")
    os.symlink("b", looped / "a")
    os.symlink("a", looped / "b")
    report = WalkReport()
    digest = directory_fingerprint(looped, report=report)
    assert digest == without_links  # same files, the loops add nothing
    assert report.num_loops == 4
    assert set(report.loops) == {"a", "b", "bounding_box_train/again/", "query/up/"}
    df, rep = build_manifest_with_report(looped)
    assert rep.num_images == {"train": 4, "query": 4, "gallery": 4}


def test_looping_image_link_is_left_out_and_reported(tmp_path):
    root = _market(tmp_path / "d")
    q = root / "query"
    os.symlink("0009_c2s1_000001_01.jpg", q / "0009_c1s1_000001_01.jpg")
    os.symlink("0009_c1s1_000001_01.jpg", q / "0009_c2s1_000001_01.jpg")
    df, rep = build_manifest_with_report(root)
    assert rep.num_symlink_loops == 2
    assert rep.symlink_loop_examples == ["query/0009_c1s1_000001_01.jpg", "query/0009_c2s1_000001_01.jpg"]
    assert not df.path.str.contains("0009").any()
    assert any("symlink loops" in w for w in rep.warnings)


def test_root_that_is_a_symlink_loop(tmp_path):
    os.symlink(tmp_path / "r2", tmp_path / "r1")
    os.symlink(tmp_path / "r1", tmp_path / "r2")
    with pytest.raises(FileNotFoundError, match="symbolic link that does not resolve"):
        build_manifest_with_report(tmp_path / "r1")


def test_external_links_policy_in_manifest_and_fingerprint(tmp_path):
    """Before: links out of the root were followed silently, in the manifest and the fingerprint."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (64, 128), (9, 9, 9)).save(outside / "0002_c3s1_000009_01.jpg")
    plain = _market(tmp_path / "plain")
    root = _market(tmp_path / "root")
    without_links = directory_fingerprint(root)
    os.symlink(outside / "0002_c3s1_000009_01.jpg", root / "bounding_box_test" / "0002_c3s1_000009_01.jpg")
    os.symlink(outside, root / "bounding_box_test" / "extra")  # an external folder

    df, rep = build_manifest_with_report(root)
    assert rep.external_links == "skip" and rep.num_external_links == 1
    assert rep.external_link_examples == ["bounding_box_test/0002_c3s1_000009_01.jpg"]
    assert rep.num_images == {"train": 4, "query": 4, "gallery": 4}
    assert any("resolving outside the data root, left out" in w for w in rep.warnings)
    walk = WalkReport()
    assert directory_fingerprint(root, report=walk) == without_links
    assert walk.num_external == 2 and "bounding_box_test/extra" in walk.external

    df_keep, rep_keep = build_manifest_with_report(root, external_links="keep")
    assert rep_keep.num_images["gallery"] == 5 and rep_keep.num_external_links == 1
    assert "bounding_box_test/0002_c3s1_000009_01.jpg" in set(df_keep.path)
    assert directory_fingerprint(root, external_links="keep") != without_links

    # The root itself may be a link: nothing inside it counts as external because of that.
    os.symlink(plain, tmp_path / "rootlink")
    df_link, rep_link = build_manifest_with_report(tmp_path / "rootlink")
    assert rep_link.num_external_links == 0 and len(df_link) == 12
    assert directory_fingerprint(tmp_path / "rootlink") == directory_fingerprint(plain)

    with pytest.raises(ValueError, match="external_links must be one of"):
        build_manifest_with_report(root, external_links="follow")  # type: ignore[arg-type]


def test_tree_of_external_links_only_says_so(tmp_path):
    real = _market(tmp_path / "real")
    root = tmp_path / "links"
    root.mkdir()
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        os.symlink(real / split, root / split)
    with pytest.raises(DatasetLayoutError, match="resolves outside the data root.*external_links='keep'"):
        build_manifest_with_report(root)
    assert len(build_manifest_with_report(root, external_links="keep")[0]) == 12


@pytest.mark.skipif(not Path("/etc/passwd").is_file(), reason="no /etc/passwd on this machine")
def test_link_to_etc_passwd_never_echoes_its_content(tmp_path):
    """Before: 'not a JPEG, PNG or BMP image (starts with 72 6f 6f 74 3a 78 3a 30)' = 'root:x:0'."""
    root = _market(tmp_path / "d")
    link = root / "query" / "0001_c3s1_000001_01.jpg"
    os.symlink("/etc/passwd", link)
    head = Path("/etc/passwd").read_bytes()[:8]
    df, rep = build_manifest_with_report(root)  # default: skipped as external, never read
    assert rep.external_link_examples == ["query/0001_c3s1_000001_01.jpg"] and rep.bad_images == []
    with pytest.raises(BadImageError) as info:
        build_manifest_with_report(root, external_links="keep")
    msg = str(info.value)
    assert "query/0001_c3s1_000001_01.jpg: not a JPEG, PNG or BMP image (text content)" in msg
    for leak in (head.hex(" "), head.hex(), head.decode("latin-1"), repr(head)):
        assert leak not in msg
    secret = tmp_path / "key.jpg"
    secret.write_bytes(b"\x01\x02SECRET-TOKEN-0123456789")
    reason = check_image_file(secret)
    assert reason == "not a JPEG, PNG or BMP image (unrecognised binary content)"


def test_junk_only_tree_says_so(tmp_path):
    """Before: '0 entries skipped, 3 junk dropped; e.g. no image files at all'."""
    root = tmp_path / "junk"
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (64, 128)).save(root / split / "-1_c1s1_000001_01.jpg")
    with pytest.raises(DatasetLayoutError, match=r"nothing usable .*every image is junk \(pid -1\): 3 dropped"):
        build_manifest_with_report(root)
    for split in ("bounding_box_train", "query", "bounding_box_test"):
        (root / split / "notes.txt").write_text("x")
        Image.new("RGB", (64, 128)).save(root / split / "foo.jpg")
    with pytest.raises(DatasetLayoutError, match=r"nothing usable .*only junk: 6 entries skipped, 3 junk"):
        build_manifest_with_report(root)


# ---------------------------------------------------------------------------------------------
# 2. images: 16-bit, bombs, large images, cache plan


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    """Before: every pixel above 255 clipped to white (99.5 % of this image)."""
    values = (np.arange(128 * 64, dtype=np.int64).reshape(128, 64) * 8).astype(np.uint16)
    path = tmp_path / "0001_c1s1_000001_01.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    img = decode_image(path)
    expected = ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert img.shape == (3, 128, 64)
    for c in range(3):
        assert np.array_equal(img[c].numpy(), expected)
    assert float((img == 255).float().mean()) < 0.01
    cache = ImageCache.from_paths(tmp_path, [path.name])
    assert torch.equal(cache.get([0])[0], img)


def test_decompression_bomb_is_a_named_bad_image(tmp_path):
    """Before: PIL's DecompressionBombError, no file named, and on_bad_image='skip' did not skip it."""
    root = _market(tmp_path / "d")
    bomb = _bomb_png(root / "query" / "0002_c3s1_000003_01.png")
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(BadImageError, match=r"query/0002_c3s1_000003_01.png: decompression bomb refused"):
        build_manifest_with_report(root)
    df, rep = build_manifest_with_report(root, on_bad_image="skip")
    assert rep.bad_images == ["query/0002_c3s1_000003_01.png"]
    assert "900000000 pixels" in rep.bad_image_reasons["query/0002_c3s1_000003_01.png"]
    assert len(df) == 12
    with pytest.raises(ImageDecodeError, match=rf"{bomb}: decompression bomb refused"):
        decode_image(bomb)
    with pytest.raises(ImageDecodeError, match=rf"{bomb}: decompression bomb refused"):
        ImageCache.from_paths(root, ["query/0002_c3s1_000003_01.png"])


def test_cache_reports_its_size_before_building(tmp_path, monkeypatch):
    src = tmp_path / "src"
    rels = _source_images(src, n=5, size=(64, 128))
    Image.new("RGB", (3000, 1500), (1, 2, 3)).save(src / "big.jpg")
    rels.append("big.jpg")
    events: list = []
    real_decode = cache_mod.decode_image

    def decode(path, max_side):
        events.append("decode")
        return real_decode(path, max_side)

    monkeypatch.setattr(cache_mod, "decode_image", decode)
    cache = ImageCache.from_paths(src, rels, mode="disk", cache_dir=tmp_path / "c", num_threads=1,
                                  report=lambda plan: events.append(plan))
    plan = events[0]
    assert isinstance(plan, dict) and events[1:] == ["decode"] * 6
    expected_bytes = 5 * 3 * 128 * 64 + 3 * 512 * 1024
    assert plan["images"] == 6 and plan["bytes"] == expected_bytes and plan["downscaled"] == 1
    assert plan["max_side"] == 1024 and plan["path"] == str(cache.path)
    assert cache.nbytes == expected_bytes and tuple(cache.shapes[-1]) == (3, 512, 1024)
    assert plan_image_cache(src, rels).nbytes == expected_bytes


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, {root!r})
    import torch  # noqa: F401
    from reid_pipeline.data.cache import ImageCache
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache = ImageCache.from_paths({folder!r}, [{name!r}], num_threads=1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"delta_mib": (after - before) / 1024, "shape": [int(v) for v in cache.shapes[0]]}}))
    """
)


@pytest.mark.parametrize("fmt,bound_mib", [("jpg", 100), ("png", 400)])
def test_large_image_is_downscaled_at_decode_with_bounded_rss(tmp_path, fmt, bound_mib):
    """Before: caching one 8000×8000 image raised the peak RSS by ~856 MiB (full-size decode,
    RGB copy, numpy copy, transpose copy, 192 MB buffer); now the JPEG is decoded at 1/8 scale
    by draft and every image is stored at 1024 px on its longer side."""
    path = tmp_path / f"big.{fmt}"
    im = Image.new("RGB", (8000, 8000), (120, 60, 30))
    im.paste((10, 200, 90), (1000, 1000, 5000, 7000))
    im.save(path)
    del im
    script = _RSS_SCRIPT.format(root=str(PROJECT_ROOT), folder=str(tmp_path), name=path.name)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shape"] == [3, 1024, 1024]
    assert result["delta_mib"] < bound_mib, result


# ---------------------------------------------------------------------------------------------
# 1. CLIP name vs path, messages


@pytest.mark.parametrize("spec,name", [("ViT-B/16", "ViT-B/16"), ("vitb16", "ViT-B/16"), ("vit-b/16", "ViT-B/16"),
                                       ("RN50", "RN50"), ("rn50", "RN50"), ("ViT-L/14@336px", "ViT-L/14@336px")])
def test_known_model_names_are_names(tmp_path, spec, name):
    """Before: the presets' ``ViT-B/16`` became the path <cwd>/ViT-B/16 (in ReidSettings)."""
    assert resolve_clip_source(spec, base_dir=tmp_path) == name


def test_paths_are_paths(tmp_path, tiny_clip_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "clip.pt").write_bytes(b"x")
    (tmp_path / "my_clip").write_bytes(b"x")
    assert resolve_clip_source("weights/clip.pt", base_dir=tmp_path) == str(tmp_path / "weights" / "clip.pt")
    assert resolve_clip_source("my_clip", base_dir=tmp_path) == str(tmp_path / "my_clip")
    assert resolve_clip_source(str(tiny_clip_path)) == str(tiny_clip_path.resolve())
    assert resolve_clip_source("./ViT-B/16", base_dir=tmp_path, must_exist=False) == str(tmp_path / "ViT-B" / "16")
    with pytest.raises(ClipWeightsError, match=r"nope.pt: no such file"):
        resolve_clip_source("nope.pt", base_dir=tmp_path)
    with pytest.raises(ClipWeightsError, match="is a directory"):
        resolve_clip_source("./weights", base_dir=tmp_path)


def test_unknown_model_name(tmp_path):
    with pytest.raises(ClipWeightsError, match=r"'ViT-Z/99': unknown model name \(known: RN50, .*ViT-B/16"):
        resolve_clip_source("ViT-Z/99", base_dir=tmp_path)
    with pytest.raises(ClipWeightsError, match="unknown model name"):
        load_clip("ViT-Z/99")
    with pytest.raises(ClipWeightsError, match="empty value"):
        resolve_clip_source("  ")


def test_uncached_model_name_says_where_to_put_the_file(tmp_path):
    """Before: 'could not be loaded or downloaded into … (<urlopen error …>)' after a network try."""
    target = cached_weights_path("ViT-B/16", tmp_path / "clip")
    assert target == tmp_path / "clip" / "ViT-B-16.pt"
    with pytest.raises(ClipWeightsError) as info:
        load_clip("vitb16", download_root=str(tmp_path / "clip"), allow_download=False)
    msg = str(info.value)
    assert "'ViT-B/16': its weights are not cached" in msg
    assert f"{target} does not exist" in msg and "file ViT-B-16.pt" in msg and f"to {target}" in msg


def test_truncated_checkpoint_says_truncated_or_corrupt(tmp_path, tiny_clip_path):
    """Before: 'an unrecognised file (first bytes b'PK\\x03\\x04…')'."""
    data = tiny_clip_path.read_bytes()
    for cut in (5000, len(data) // 2, len(data) - 10):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(ClipWeightsError, match=rf"{path}: a truncated or corrupt zip archive") as info:
            load_clip(str(path))
        assert "unrecognised" not in str(info.value)


def test_torch_advice_and_ansi_codes_are_not_forwarded(tmp_path):
    """Before: torch's message, with its ANSI bold codes and 'Re-running torch.load with weights_only
    set to False will likely succeed', was passed on verbatim."""
    path = tmp_path / "module.pt"
    torch.save({"m": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(ClipWeightsError) as info:
        load_clip(str(path))
    msg = str(info.value)
    assert "\x1b" not in msg and "weights_only" not in msg and "False" not in msg
    assert "torch.nn.modules.linear.Linear" in msg and "could run arbitrary code" in msg
    assert _clean_message("\x1b[1mbold\x1b[0m and \x1b[31mred\x1b[0m") == "bold and red"


# ---------------------------------------------------------------------------------------------
# 5. evaluation input checks


_Q = np.random.default_rng(0).random((6, 8), dtype=np.float32)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_non_positive_or_non_integer_chunk_size(bad):
    """Before: evaluate_rank clamped 0 and -2 to 1 silently; floats failed inside range()."""
    with pytest.raises(ValueError, match=rf"chunk_size must be a positive integer, got {bad!r}"):
        pairwise_distance(_Q, _Q, chunk_size=bad)
    d = pairwise_distance(_Q, _Q).numpy()
    ids, cams = np.arange(6), np.array([0, 1] * 3)
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer or None"):
        evaluate_rank(d, ids, ids, cams, 1 - cams, chunk_size=bad)
    for name in ("query_chunk", "block_size"):
        with pytest.raises(ValueError, match=rf"{name} must be a positive integer or None"):
            re_ranking(_Q, _Q, k1=2, k2=1, **{name: bad})


@pytest.mark.parametrize(
    "features,message",
    [
        (_Q > 0.5, "must hold real numbers, got a numpy array of dtype bool"),
        (_Q.astype(np.complex64), "must hold real numbers, got a numpy array of dtype complex64"),
        (torch.from_numpy(_Q).to(torch.complex64), "must hold real numbers, got dtype torch.complex64"),
        (torch.from_numpy(_Q) > 0.5, "must hold real numbers, got dtype torch.bool"),
        (np.array(1.0), "must be 2-D \\(num_samples, dim\\), got a 0-d scalar"),
        (torch.tensor(1.0), "must be 2-D \\(num_samples, dim\\), got a 0-d scalar"),
        (np.zeros((6, 0), np.float32), "have dimension 0"),
        (_Q.astype(object), "must hold real numbers, got a numpy array of dtype object"),
    ],
    ids=["bool", "complex", "complex-torch", "bool-torch", "0-d", "0-d-torch", "dim-0", "object"],
)
def test_bad_features_are_rejected(features, message):
    """Before: bool and complex features were cast to float (complex lost its imaginary part) and
    gave distances; a 0-d array was reported as shape (1,); dimension 0 gave all-zero distances."""
    gallery = np.zeros((6, 0), np.float32) if message == "have dimension 0" else _Q
    with pytest.raises(ValueError, match=rf"query features {message}"):
        pairwise_distance(features, gallery)
    with pytest.raises(ValueError, match=rf"query features {message}"):
        re_ranking(features, gallery, k1=2, k2=1)


@pytest.mark.parametrize(
    "distmat,message",
    [
        (np.ones((6, 6), dtype=bool), "got a numpy array of dtype bool"),
        (np.ones((6, 6), dtype=np.complex64), "must hold real numbers"),
        (np.ones((6, 6), dtype=object), "got a numpy array of dtype object"),
        (np.array(1.0), "got a 0-d scalar"),
    ],
    ids=["bool", "complex", "object", "0-d"],
)
def test_evaluate_rank_rejects_bad_distmat(distmat, message):
    ids, cams = np.arange(6), np.array([0, 1] * 3)
    with pytest.raises(ValueError, match=message):
        evaluate_rank(distmat, ids, ids, cams, 1 - cams)
