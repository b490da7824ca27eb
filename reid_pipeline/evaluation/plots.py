"""Pictures of results: training curves, CMC curves, rank lists and cross-domain heatmaps (PNG), without any GUI backend.

Matplotlib is driven through its Agg canvas directly (no ``pyplot`` global state), so these
functions are safe in worker processes and never change the caller's backend.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..storage import atomic_write_bytes

__all__ = ["plot_cmc", "plot_cross_domain", "plot_rank_list", "plot_training_history", "select_rank_list", "thumbnail_png"]

MATCH_COLOR = (0, 170, 0)
MISMATCH_COLOR = (220, 0, 0)
QUERY_COLOR = (40, 40, 40)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _save_figure(fig, out_path: str | os.PathLike | None) -> bytes | Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    return data if out_path is None else atomic_write_bytes(out_path, data)


def plot_training_history(
    history: Sequence[Mapping[str, float]],
    panels: Mapping[str, Sequence[str]],
    out_path: str | os.PathLike | None = None,
    title: str = "training",
    log_scale: Sequence[str] = ("learning rate",),
    dpi: int = 100,
) -> bytes | Path:
    """Per-epoch curves of a training history (the rows :func:`~reid_pipeline.training.loop.run_training`
    returns), one panel per entry of ``panels`` (panel title -> history fields), e.g.
    ``{"loss": ["loss"], "learning rate": ["lr"]}``. Returns PNG bytes or the written path.
    """
    if not history:
        raise ValueError("no epochs to plot (the history is empty)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.3 * len(panels), 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    epochs = [row["epoch"] for row in history]
    for i, (name, fields) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, len(panels), i)
        for key in fields:
            if key not in history[0]:
                raise ValueError(f"history rows have no field {key!r} (fields: {sorted(history[0])})")
            ax.plot(epochs, [row[key] for row in history], marker="o" if len(epochs) < 30 else None, markersize=3,
                    label=key)
        if name in log_scale:
            ax.set_yscale("log")
        ax.set_title(f"{title}: {name}" if i == 1 else name)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if len(fields) > 1:
            ax.legend(fontsize=8)
    return _save_figure(fig, out_path)


def thumbnail_png(path: str | os.PathLike, max_side: int = 320) -> bytes:
    """A small PNG copy of an image file (for inline display; the full picture stays a path)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def plot_cmc(
    curves: Mapping[str, Any],
    out_path: str | os.PathLike | None = None,
    title: str = "CMC curve",
    max_rank: int | None = None,
    dpi: int = 100,
) -> bytes | Path:
    """Plot one or more CMC curves (name -> cmc array, ``cmc[r]`` = rank-(r+1) accuracy).

    Returns the PNG bytes, or writes them atomically to ``out_path`` and returns that path.
    """
    if not curves:
        raise ValueError("plot_cmc needs at least one curve (got an empty mapping)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    longest = 0
    for name, cmc in curves.items():
        arr = _to_numpy(cmc).astype(np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"CMC curve {name!r} is empty")
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"CMC curve {name!r} must hold values in [0, 1]")
        if max_rank is not None:
            arr = arr[:max_rank]
        ranks = np.arange(1, arr.size + 1)
        ax.plot(ranks, arr * 100.0, marker="o" if arr.size <= 20 else None, markersize=3,
                label=f"{name} (rank-1 {arr[0] * 100:.1f}%)")
        longest = max(longest, arr.size)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, max(longest, 2))
    ax.set_ylim(0, 100.5)
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save_figure(fig, out_path)


def plot_cross_domain(
    matrices: Mapping[str, Any],
    train_names: Sequence[str],
    test_names: Sequence[str],
    out_path: str | os.PathLike | None = None,
    dpi: int = 100,
) -> bytes | Path:
    """Heatmaps of train × test matrices (metric name → ``(len(train_names), len(test_names))`` values in
    [0, 1]), one panel per metric, each cell labelled in percent; the diagonal is in-domain.

    Returns the PNG bytes, or writes them atomically to ``out_path`` and returns that path.
    """
    if not matrices:
        raise ValueError("plot_cross_domain needs at least one matrix (got an empty mapping)")
    shape = (len(train_names), len(test_names))
    arrays = {}
    for name, values in matrices.items():
        arr = _to_numpy(values).astype(np.float64)
        if arr.shape != shape:
            raise ValueError(f"cross-domain matrix {name!r} has shape {arr.shape}, expected {shape} (train × test)")
        if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"cross-domain matrix {name!r} must hold values in [0, 1]")
        arrays[name] = arr
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = 1.2 + 0.9 * max(shape)
    fig = Figure(figsize=(side * len(arrays) + 0.8, side), dpi=dpi)
    FigureCanvasAgg(fig)
    for i, (name, arr) in enumerate(arrays.items()):
        ax = fig.add_subplot(1, len(arrays), i + 1)
        image = ax.imshow(arr * 100.0, vmin=0.0, vmax=100.0, cmap="viridis")
        for r in range(shape[0]):
            for c in range(shape[1]):
                ax.text(c, r, f"{arr[r, c] * 100:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if arr[r, c] < 0.6 else "black")
        ax.set_xticks(range(shape[1]), list(test_names), rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(shape[0]), list(train_names), fontsize=8)
        ax.set_xlabel("tested on")
        ax.set_ylabel("trained on")
        ax.set_title(f"{name} (%)")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save_figure(fig, out_path)


def select_rank_list(
    distmat: Any, q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, query_index: int, topk: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``topk`` gallery indices of one query under the evaluation protocol (same pid and same
    camera excluded, ties by gallery index) and whether each is a true match."""
    row = _to_numpy(distmat[query_index]).reshape(-1)
    gp, gc = _to_numpy(g_pids), _to_numpy(g_camids)
    qp, qc = _to_numpy(q_pids)[query_index], _to_numpy(q_camids)[query_index]
    order = np.argsort(row, kind="stable")
    keep = ~((gp[order] == qp) & (gc[order] == qc))
    top = order[keep][:topk]
    return top, gp[top] == qp


def _load_tile(path: Path, size: tuple[int, int], border: int, color: tuple[int, int, int]) -> Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"rank list image not found: {path}")
    with Image.open(path) as im:
        tile = im.convert("RGB").resize(size, Image.BILINEAR)
    framed = Image.new("RGB", (size[0] + 2 * border, size[1] + 2 * border), color)
    framed.paste(tile, (border, border))
    return framed


def plot_rank_list(
    query_paths: Sequence[str | os.PathLike],
    gallery_paths: Sequence[str | os.PathLike],
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    root: str | os.PathLike | None,
    out_path: str | os.PathLike,
    num_queries: int = 5,
    topk: int = 10,
    query_indices: Sequence[int] | None = None,
    image_size: tuple[int, int] = (64, 128),
    border: int = 4,
) -> Path:
    """Rank-list picture like torchreid's visrank: one row per query (dark frame) followed by
    its top-``topk`` gallery images under the protocol, framed green (match) or red (non-match).

    Image paths are relative to ``root`` (or used as given when ``root`` is None). Queries are
    ``query_indices`` if given, else ``num_queries`` spread evenly over the query set. The PNG is
    written atomically to ``out_path``, which is returned.
    """
    dist = distmat if isinstance(distmat, torch.Tensor) else np.asarray(distmat)
    num_q, num_g = int(dist.shape[0]), int(dist.shape[1])
    for name, seq, n in (("query_paths", query_paths, num_q), ("gallery_paths", gallery_paths, num_g),
                         ("q_pids", q_pids, num_q), ("q_camids", q_camids, num_q),
                         ("g_pids", g_pids, num_g), ("g_camids", g_camids, num_g)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries but distmat has shape {(num_q, num_g)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if query_indices is None:
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1, got {num_queries}")
        query_indices = np.unique(np.linspace(0, num_q - 1, min(num_queries, num_q)).round().astype(int)).tolist()
    for qi in query_indices:
        if not 0 <= int(qi) < num_q:
            raise ValueError(f"query index {qi} out of range for {num_q} queries")
    base = Path(root) if root is not None else None

    def resolve(p: str | os.PathLike) -> Path:
        p = Path(p)
        return p if base is None or p.is_absolute() else base / p

    tile_w, tile_h = image_size[0] + 2 * border, image_size[1] + 2 * border
    gap, pad, label_h = 16, 4, 14
    width = pad + tile_w + gap + topk * (tile_w + pad)
    height = pad + len(query_indices) * (tile_h + label_h + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, qi in enumerate(query_indices):
        qi = int(qi)
        y = pad + row * (tile_h + label_h + pad)
        canvas.paste(_load_tile(resolve(query_paths[qi]), image_size, border, QUERY_COLOR), (pad, y + label_h))
        draw.text((pad, y), f"query {qi}", fill=(0, 0, 0))
        top, match = select_rank_list(dist, q_pids, g_pids, q_camids, g_camids, qi, topk)
        for r, (gi, ok) in enumerate(zip(top.tolist(), match.tolist())):
            x = pad + tile_w + gap + r * (tile_w + pad)
            color = MATCH_COLOR if ok else MISMATCH_COLOR
            canvas.paste(_load_tile(resolve(gallery_paths[gi]), image_size, border, color), (x, y + label_h))
            draw.text((x, y), f"{r + 1}", fill=color)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(out_path, buf.getvalue())
