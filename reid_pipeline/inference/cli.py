"""``reid-search``: index a folder of images, query it, export the encoder to ONNX.

::

    reid-search index  --model M --images DIR --out INDEX [--batch-size 64] [--shard-size 2048]
    reid-search query  --index INDEX IMAGE... [--top-k 10] [--rerank] [--json] [--png ranked.png] [--model M]
    reid-search export --model M --out encoder.onnx [--images DIR] [--opset 17]

``M`` is a ``visual_encoder`` artefact folder, its ``.safetensors`` file, or (index/query only) an
exported ``.onnx`` file. ``index`` shows a progress bar on stderr and resumes an interrupted build
(rerun the same command). Market-1501-style file names (``0002_c1s1_000451_03.jpg``) give the
gallery items their person and camera ids. ``query`` reloads the encoder recorded in the index
(``--model`` to override) and refuses one that did not build it. Exit status: 0 on success, 1 on
a usage or input error (message on stderr), 3 when some images could not be read but the rest
were processed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from reid_pipeline.storage import CheckpointError

__all__ = ["main", "build_parser", "plot_search_results"]

EXIT_USAGE = 1
EXIT_PARTIAL = 3


class _Progress:
    """A one-line text progress bar on stderr (rate and ETA), redrawn at most every 0.2 s."""

    def __init__(self, label: str, stream=None, width: int = 30) -> None:
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()
        self.last = 0.0
        self.first_done: int | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done, self.start = done, now
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * self.width)
        rate = (done - self.first_done) / (now - self.start) if now > self.start and done > self.first_done else 0.0
        eta = f"{(total - done) / rate:.0f}s" if rate > 0 and done < total else "-"
        self.stream.write(f"\r{self.label} [{bar:<{self.width}}] {done}/{total}  {rate:.1f} img/s  ETA {eta} ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid-search", description="Search people in a gallery with a trained ReID encoder.")
    sub = parser.add_subparsers(dest="command", required=True)

    def device_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--clip", default=None, help="where the CLIP weights are now, if not at the recorded path")

    p = sub.add_parser("index", help="extract features of every image in a folder into a gallery index")
    p.add_argument("--model", required=True, help="encoder folder, .safetensors or .onnx")
    p.add_argument("--images", required=True, help="folder of gallery images (searched recursively)")
    p.add_argument("--out", required=True, help="folder to write the index into")
    p.add_argument("--shard-size", type=int, default=2048, help="images per saved shard (the unit of resuming)")
    p.add_argument("--ids", choices=["auto", "none"], default="auto",
                   help="auto: person/camera ids from Market-style names when every name has them")
    p.add_argument("--overwrite", action="store_true", help="replace an index built by another encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    device_args(p)

    p = sub.add_parser("query", help="top-k gallery matches of query images")
    p.add_argument("--index", required=True, help="folder written by `reid-search index`")
    p.add_argument("images", nargs="+", help="query image files")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (as in the evaluation)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--png", default=None, help="write the rank-list picture here")
    p.add_argument("--model", default=None, help="encoder to use (default: the one recorded in the index)")
    device_args(p)

    p = sub.add_parser("export", help="export the encoder to ONNX, checked against PyTorch with onnxruntime")
    p.add_argument("--model", required=True, help="encoder folder or .safetensors")
    p.add_argument("--out", required=True, help="the .onnx file to write (a .json sidecar goes beside it)")
    p.add_argument("--images", default=None, help="folder of real images to check the export on (gallery for top-k)")
    p.add_argument("--max-images", type=int, default=200, help="at most this many of them")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the library's DEFAULT_OPSET)")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--clip", default=None, help="where the CLIP weights are now, if not at the recorded path")
    return parser


def _load_predictor(model: str, args: argparse.Namespace):
    from reid_pipeline.inference import ReIDPredictor

    return ReIDPredictor.load(model, device=args.device, precision=args.precision, clip=args.clip,
                              batch_size=args.batch_size)


def _cmd_index(args: argparse.Namespace) -> int:
    from reid_pipeline.inference import build_gallery_index, labels_from_names, list_images

    images = list_images(args.images)
    if not images:
        raise ValueError(f"{args.images}: no image files (.jpg, .jpeg, .png, .bmp) found")
    predictor = _load_predictor(args.model, args)
    labels = labels_from_names(images) if args.ids == "auto" else None
    ids, cams = labels if labels is not None else (None, None)
    print(f"indexing {len(images)} images from {args.images} with {predictor}", file=sys.stderr)
    progress = None if args.quiet else _Progress("index")
    index = build_gallery_index(
        predictor, images, args.out, ids=ids, camids=cams, root=Path(args.images).resolve(),
        shard_size=args.shard_size, overwrite=args.overwrite, progress=progress,
        log=lambda msg: print(msg, file=sys.stderr),
    )
    for item in index.skipped:
        print(f"warning: skipped unreadable image {item['name']}: {item['reason']}", file=sys.stderr)
    print(f"wrote {args.out}: {len(index)} images, {index.feature_dim}-d features"
          + (", with person/camera ids" if index.ids is not None else ""))
    return EXIT_PARTIAL if index.skipped else 0


def plot_search_results(index, results, query_images: Sequence[str], out_path: str | Path,
                        query_ids: Sequence[int] | None = None) -> Path:
    """A rank-list picture of search results: one row per query, then its top-k in search order.

    When both the queries' ids (Market-style query names) and the gallery's ids are known, this is
    the evaluation's :func:`~reid_pipeline.evaluation.plots.plot_rank_list` (green = same person,
    red = another) over the queries' top-k columns, with no gallery item excluded. Otherwise the
    same layout with neutral grey frames and the distance above each tile (a match is unknown).
    """
    from PIL import Image, ImageDraw

    from reid_pipeline.evaluation.plots import QUERY_COLOR, _load_tile, plot_rank_list
    from reid_pipeline.storage import atomic_write_bytes

    k = max(len(r.indices) for r in results)
    if query_ids is not None and index.ids is not None:
        cols = sorted({i for r in results for i in r.indices})
        pos = {g: c for c, g in enumerate(cols)}
        dist = np.full((len(results), len(cols)), np.inf, dtype=np.float64)
        for row, r in enumerate(results):
            for rank, g in enumerate(r.indices):
                dist[row, pos[g]] = rank  # the search order (re-ranked or faiss order kept exactly)
        return plot_rank_list(
            list(query_images), [str(index.resolve(index.paths[g])) for g in cols], dist,
            np.asarray(query_ids, dtype=np.int64), index.ids[cols], np.full(len(results), -1, dtype=np.int64),
            np.zeros(len(cols), dtype=np.int64), root=None, out_path=out_path,
            query_indices=list(range(len(results))), topk=k,
        )
    size, border, gap, pad, label_h = (64, 128), 4, 16, 4, 14
    tile_w, tile_h = size[0] + 2 * border, size[1] + 2 * border
    canvas = Image.new("RGB", (pad + tile_w + gap + k * (tile_w + pad), pad + len(results) * (tile_h + label_h + pad)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    grey = (150, 150, 150)
    for row, (r, q) in enumerate(zip(results, query_images)):
        y = pad + row * (tile_h + label_h + pad)
        canvas.paste(_load_tile(Path(q), size, border, QUERY_COLOR), (pad, y + label_h))
        draw.text((pad, y), f"query {row}", fill=(0, 0, 0))
        for rank, (g, d) in enumerate(zip(r.indices, r.distances)):
            x = pad + tile_w + gap + rank * (tile_w + pad)
            canvas.paste(_load_tile(index.resolve(index.paths[g]), size, border, grey), (x, y + label_h))
            draw.text((x, y), f"{rank + 1}: {d:.3f}", fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return atomic_write_bytes(out_path, buf.getvalue())


def _cmd_query(args: argparse.Namespace) -> int:
    from reid_pipeline.inference import GalleryIndex, labels_from_names

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    index = GalleryIndex.load(args.index)
    model = args.model or index.encoder.get("source")
    if not model:
        raise ValueError(f"{args.index}: the index does not record its encoder; pass --model")
    index.attach(_load_predictor(model, args))
    readable, failures = [], []
    for p in args.images:
        (readable if Path(p).is_file() else failures).append(p)
    for p in failures:
        print(f"error: query image not found: {p}", file=sys.stderr)
    extraction = index.predictor.extract_report(readable)
    for f in extraction.failures:
        print(f"error: cannot read query image {f.name}: {f.reason}", file=sys.stderr)
    names = extraction.names
    if not names:
        raise ValueError("none of the query images could be read")
    results = index.search(extraction.features, k=args.top_k, rerank=args.rerank)
    for r, name in zip(results, names):
        r.query = name
    if args.json:
        print(json.dumps({"index": str(args.index), "rerank": bool(args.rerank), "fingerprint": index.fingerprint,
                          "queries": [r.to_dict() for r in results],
                          "unreadable": failures + [f.name for f in extraction.failures]}, indent=2))
    else:
        for r in results:
            print(f"query {r.query}")
            for rank, (p, d) in enumerate(zip(r.paths, r.distances), start=1):
                ident = f"  id {r.ids[rank - 1]}" if r.ids is not None else ""
                print(f"  {rank:>3}  {d:.4f}  {p}{ident}")
    if args.png:
        labels = labels_from_names(names)
        png = plot_search_results(index, results, names, args.png, query_ids=labels[0] if labels else None)
        print(f"wrote {png}", file=sys.stderr)
    return EXIT_PARTIAL if failures or extraction.failures else 0


def _cmd_export(args: argparse.Namespace) -> int:
    from reid_pipeline.inference import DEFAULT_OPSET, export_onnx, list_images

    gallery = None
    if args.images:
        gallery = [str(p) for p in list_images(args.images)[: max(1, args.max_images)]]
        if not gallery:
            raise ValueError(f"{args.images}: no image files to check the export on")
    report = export_onnx(args.model, args.out, gallery_images=gallery, opset=args.opset or DEFAULT_OPSET,
                         atol=args.atol, clip=args.clip)
    top = ""
    if "top_k" in report:
        same = "identical" if report["top_k_identical"] else "identical up to numerical ties"
        top = f", top-{report['top_k']} {same} on {report['queries']} queries over {report['gallery_images']} images"
    print(f"wrote {args.out} (opset {report['opset']}): max abs diff {report['max_abs_diff']:.2e} on "
          f"{report['check_images']} {report['check_source']}{top}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"index": _cmd_index, "query": _cmd_query, "export": _cmd_export}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"reid-search {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
