"""Stage-2 input pipeline: decode-once cache + batched tensor transforms vs per-sample PIL.

Both sides produce the same thing — P×K batches of 64 augmented, normalised 256×128 images with
CLIP-ReID's train transform (bicubic resize, flip 0.5, pad 10 + random crop, normalise, random
erasing 0.5 with per-pixel noise) — from the same ~500 synthetic 128×64 JPEGs:

* **ours** — :class:`ImageCache` (decoded once, uint8) → :class:`TrainTransform` on the whole batch
  on ``--device``;
* **reference** — a torch ``Dataset`` that opens and decodes the JPEG and runs the torchvision
  ``Compose`` + timm-style erasing per sample, batched by a ``DataLoader`` (in-process, and with
  worker processes as CLIP-ReID runs it).

Each side is timed over the same batches, best of ``--repeats``; the speedup is against the
*fastest* reference configuration. The cache's one-off decode time is reported separately.
With ``--device cuda`` it also times a ViT-B/16-sized random-weight ReIDModel (forward + backward
+ Adam step, batch 64, bf16 autocast) to check that the pipeline out-runs the model.

Run: ``.venv/bin/python benchmarks/input_pipeline.py [--device cuda]``. The last line is
``input pipeline speedup: <ratio>x``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.sampler import PKSampler
from reid_pipeline.data.transforms import TrainTransform
from reid_pipeline_tests.reference_transforms import ReferenceTrainTransform


def write_images(root: Path, n: int, ids: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """``n`` synthetic 128×64 person-like JPEGs (colour blocks on gradients, noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:128, 0:64]
    rels, pids = [], []
    colours = rng.integers(0, 256, (ids, 2, 3))
    for i in range(n):
        pid = i % ids
        img = np.empty((128, 64, 3), np.float64)
        img[...] = (40 + 60 * yy / 127.0)[..., None] + (30 * xx / 63.0)[..., None]
        img[20:70, 14:50] = colours[pid, 0]  # "shirt"
        img[70:120, 18:46] = colours[pid, 1]  # "trousers"
        img += rng.normal(0, 10, img.shape)
        rel = f"{pid:04d}_c{i % 6 + 1}_{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / rel, quality=90)
        rels.append(rel)
        pids.append(pid)
    return rels, np.asarray(pids)


class JpegDataset(Dataset):
    """What a per-sample torch Dataset does: open + decode + transform, every time."""

    def __init__(self, root: Path, rels: list[str], transform: ReferenceTrainTransform) -> None:
        self.paths = [root / r for r in rels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        return self.transform(img)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OursRunner:
    """One timed pass = the batches through cache.fetch + TrainTransform on ``device``."""

    def __init__(self, cache: ImageCache, batches: list[list[int]], device: torch.device) -> None:
        self.cache, self.batches, self.device = cache, batches, device
        self.transform = TrainTransform(seed=0)
        # one reusable output buffer, as the training loop uses it
        self.out = torch.empty(len(batches[0]), 3, 256, 128, device=device)
        for b in batches[:2]:  # warm-up
            self.transform(cache.fetch(torch.tensor(b), device), out=self.out)
        sync(device)

    def __call__(self) -> float:
        t0 = time.perf_counter()
        for b in self.batches:
            x = self.transform(self.cache.fetch(torch.tensor(b), self.device), out=self.out)
        sync(self.device)
        assert x.shape == (len(self.batches[-1]), 3, 256, 128)
        return time.perf_counter() - t0


class ReferenceRunner:
    """One timed pass = the same batches through a per-sample Dataset and a DataLoader."""

    def __init__(self, root: Path, rels: list[str], batches: list[list[int]], workers: int) -> None:
        ds = JpegDataset(root, rels, ReferenceTrainTransform())
        flat = [i for b in batches for i in b]
        self.loader = DataLoader(ds, batch_size=len(batches[0]), sampler=flat, num_workers=workers,
                                 persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
        self.batch = len(batches[-1])
        for _ in self.loader:  # warm-up pass (starts the workers)
            pass

    def __call__(self) -> float:
        t0 = time.perf_counter()
        for x in self.loader:
            pass
        assert x.shape == (self.batch, 3, 256, 128)
        return time.perf_counter() - t0


def clip_model_module():
    """openai-clip's ``clip.model`` (needs only torch); loaded from its file when the package's
    ``__init__`` cannot be imported (e.g. ftfy missing on a GPU image where clip was carried)."""
    try:
        from reid_pipeline.model.clip_loader import import_clip

        return import_clip().model
    except Exception:
        spec = importlib.util.find_spec("clip")
        if spec is None or not spec.submodule_search_locations:
            raise
        path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
        mspec = importlib.util.spec_from_file_location("_clip_model_standalone", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
        return module


def time_model(device: torch.device, batch: int, steps: int) -> float:
    """img/s of a ViT-B/16-sized ReIDModel, forward + backward + Adam, bf16 autocast."""
    from reid_pipeline.model.clip_loader import adapt_visual
    from reid_pipeline.model.reid_model import ReIDModel
    from reid_pipeline.training.losses import Stage2Loss

    clip_model = clip_model_module()
    torch.manual_seed(0)
    full = clip_model.CLIP(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
    adapt_visual(full, (256, 128))
    model = ReIDModel(full, 751).to(device).train()
    del full
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-6)
    crit = Stage2Loss(751)
    text = torch.randn(751, 512, device=device)
    x = torch.randn(batch, 3, 256, 128, device=device)
    y = torch.arange(batch, device=device) // 4
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step() -> None:
        with amp:
            logits, feats, proj = model(x)
        loss = crit(logits, feats, proj, text, y).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="device for our batched transforms: cpu or cuda")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--ids", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8, help="P×K batches of 64 per timed pass")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers for the reference (default: #cpus, max 8)")
    ap.add_argument("--model-steps", type=int, default=20)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="reid-bench-") as tmp:
        root = Path(tmp)
        rels, pids = write_images(root, args.images, args.ids)
        sampler = PKSampler(pids, p=16, k=4, seed=0)
        batches: list[list[int]] = []
        while len(batches) < args.batches:
            batches.extend(list(sampler))
        batches = batches[: args.batches]
        n_img = sum(len(b) for b in batches)

        t0 = time.perf_counter()
        cache = ImageCache.from_paths(root, rels)
        decode_s = time.perf_counter() - t0
        if device.type == "cuda":
            cache = cache.to(device)

        runners: list[tuple[str, object]] = [
            (f"ours: cache + batched tensor transforms ({device.type})", OursRunner(cache, batches, device))]
        for w in sorted({0, workers}):
            label = "in-process" if w == 0 else f"{w} worker processes"
            runners.append((f"reference: per-sample PIL/torchvision Dataset ({label})", ReferenceRunner(root, rels, batches, w)))
        # Interleaved repeats: a burst of load from other processes hits every pipeline alike.
        best = {name: float("inf") for name, _ in runners}
        for _ in range(args.repeats):
            for name, run in runners:
                best[name] = min(best[name], run())
        rows = [(name, n_img / best[name], 1000 * best[name] / len(batches)) for name, _ in runners]
        ref_rates = [rate for name, rate, _ in rows[1:]]
        model_rate = time_model(device, 64, args.model_steps) if device.type == "cuda" else None

    print(f"{len(rels)} JPEGs 128x64, {len(batches)} PKx64 batches per pass, best of {args.repeats}; "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"one-off cache decode: {decode_s:.2f} s ({len(rels) / decode_s:.0f} img/s)")
    print(f"{'pipeline':<64} {'img/s':>10} {'ms/batch':>10}")
    for name, rate, ms in rows:
        print(f"{name:<64} {rate:>10.0f} {ms:>10.1f}")
    if model_rate is not None:
        label = "model: ViT-B/16 ReIDModel fwd+bwd+Adam, batch 64, bf16"
        print(f"{label:<64} {model_rate:>10.0f} {1000 * 64 / model_rate:>10.1f}")
        ours_rate = rows[0][1]
        verdict = "out-runs" if ours_rate > model_rate else "does NOT out-run"
        print(f"pipeline {verdict} the model: {ours_rate:.0f} vs {model_rate:.0f} img/s ({ours_rate / model_rate:.1f}x)")
    print(f"input pipeline speedup: {rows[0][1] / max(ref_rates):.1f}x")


if __name__ == "__main__":
    main()
