"""CMC plot and rank-list picture produce valid PNGs with the expected content."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from reid_pipeline.evaluation import plot_cmc, plot_rank_list
from reid_pipeline.evaluation.plots import MATCH_COLOR, MISMATCH_COLOR, select_rank_list

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_cmc_bytes_and_file(tmp_path):
    curves = {"fine-tuned": np.linspace(0.8, 1.0, 50), "re-ranked": np.linspace(0.85, 1.0, 50),
              "frozen CLIP": np.linspace(0.3, 0.7, 50)}
    data = plot_cmc(curves, title="Market-1501")
    assert isinstance(data, bytes) and data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (600, 400)
    path = plot_cmc(curves, tmp_path / "sub" / "cmc.png", max_rank=10)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary behind


@pytest.mark.parametrize(
    "curves, match", [({}, "at least one"), ({"a": []}, "empty"), ({"a": [0.5, 1.5]}, r"\[0, 1\]")]
)
def test_plot_cmc_rejects_bad_curves(curves, match):
    with pytest.raises(ValueError, match=match):
        plot_cmc(curves)


def _images(root, names, color):
    for name in names:
        Image.new("RGB", (32, 64), color).save(root / name)


def test_rank_list_layout_and_border_colours(tmp_path):
    q_paths = [f"q{i}.jpg" for i in range(3)]
    g_paths = [f"g{i}.jpg" for i in range(12)]
    _images(tmp_path, q_paths, (0, 0, 255))
    _images(tmp_path, g_paths, (200, 200, 200))
    rng = np.random.default_rng(0)
    dist = rng.random((3, 12)).astype(np.float32)
    q_pids, g_pids = np.array([0, 1, 2]), rng.integers(0, 3, 12)
    q_cams, g_cams = np.zeros(3, dtype=int), rng.integers(0, 2, 12)
    out = plot_rank_list(q_paths, g_paths, dist, q_pids, g_pids, q_cams, g_cams, tmp_path,
                         tmp_path / "ranks.png", num_queries=2, topk=4, image_size=(32, 64), border=4)
    assert out.read_bytes().startswith(PNG_MAGIC)
    with Image.open(out) as im:
        im = im.convert("RGB")
        pad, gap, label_h, tile_w, tile_h = 4, 16, 14, 40, 72
        assert im.size == (pad + tile_w + gap + 4 * (tile_w + pad), pad + 2 * (tile_h + label_h + pad))
        for row, qi in enumerate([0, 2]):  # two queries spread over three: first and last
            top, match = select_rank_list(dist, q_pids, g_pids, q_cams, g_cams, qi, 4)
            y = pad + row * (tile_h + label_h + pad) + label_h + 1  # inside the top border
            for r, ok in enumerate(match):
                x = pad + tile_w + gap + r * (tile_w + pad) + tile_w // 2
                assert im.getpixel((x, y)) == (MATCH_COLOR if ok else MISMATCH_COLOR)
            # same pid + same camera gallery items never appear
            assert not np.any((g_pids[top] == q_pids[qi]) & (g_cams[top] == q_cams[qi]))


def test_rank_list_missing_image_names_the_file(tmp_path):
    _images(tmp_path, ["q0.jpg"], (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="g0.jpg"):
        plot_rank_list(["q0.jpg"], ["g0.jpg"], np.zeros((1, 1)), [0], [1], [0], [1], tmp_path,
                       tmp_path / "r.png")
    with pytest.raises(ValueError, match="gallery_paths"):
        plot_rank_list(["q0.jpg"], [], np.zeros((1, 1)), [0], [1], [0], [1], tmp_path, tmp_path / "r.png")
