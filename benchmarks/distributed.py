"""Benchmark: one stage-2 epoch at world size 1 (the plain loop), 1 (DDP) and 2 (DDP, gloo or NCCL).

The same data, model and global P×K batch in every run (the small CLIP, synthetic images). Timed:
the second epoch of each run (the first warms up). The communication share per step is measured in
the world-size-2 job as the time of one all-reduce of every trainable gradient (what DDP sends per
step, without overlap) divided by the step time.

    .venv/bin/python benchmarks/distributed.py [--device cpu|cuda] [--iters 8] [--size 128 64]

On a CPU machine both ranks share its cores, so world size 2 cannot be faster than 1 there: the
numbers show the overhead of the distributed machinery, not a speed-up. On GPUs each rank has its own
device (``cuda:LOCAL_RANK``) and the ``DDP world 1 / plain`` line is the per-step DDP overhead.
Last lines: ``epoch time world2/world1: <ratio>x``, ``comm share per step (world 2): <pct>%``,
``DDP world1 / plain: <ratio>x``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.tiny_clip import ensure_tiny_clip
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.storage import load_tensors, save_tensors
from reid_pipeline.training.distributed import DistributedConfig, init_distributed, shutdown
from reid_pipeline.training.stage2 import Stage2Config, build_reid_model, train_visual_encoder


def data(ids: int, per_id: int, hw: tuple[int, int]):
    g = torch.Generator().manual_seed(0)
    imgs, labels = [], []
    for pid in range(ids):
        colour = torch.randint(0, 256, (3, 1, 1), generator=g)
        for _ in range(per_id):
            imgs.append((colour + torch.randint(-40, 41, (3, *hw), generator=g)).clamp(0, 255).to(torch.uint8))
            labels.append(pid)
    return ImageCache.from_tensors(imgs), torch.tensor(labels)


def one_run(args, clip_path: str, parallel=None) -> dict[str, float]:
    size = tuple(args.size)
    device = str(parallel.device) if parallel is not None else args.device
    spec = resolve_device(device, "fp32" if device == "cpu" else "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip_model, _ = load_clip(clip_path, input_size=size)
    cache, labels = data(args.ids, args.per_id, (size[0] // 2, size[1] // 2))
    cfg = Stage2Config.paper("vit", input_size=size, epochs=2, ids_per_batch=args.p, instances_per_id=args.k,
                             max_iters_per_epoch=args.iters, lr=1e-4, warmup_epochs=1, steps=[2], log_period=10**6)
    model = build_reid_model(clip_model, args.ids, cfg)
    text = torch.nn.functional.normalize(torch.randn(args.ids, 128, generator=torch.Generator().manual_seed(0)), dim=1)
    result = train_visual_encoder(model, text, cache, labels, None, cfg, spec, parallel=parallel)
    row = result.history[-1]
    out = {"epoch_s": row["seconds"], "steps": row["steps"]}
    if parallel is not None and parallel.world_size > 1:
        grads = torch.zeros(sum(p.numel() for p in model.parameters() if p.requires_grad), device=parallel.device)
        reps = 5
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.distributed.all_reduce(grads)
        if parallel.device.type == "cuda":
            torch.cuda.synchronize()
        out["allreduce_s"] = (time.perf_counter() - t0) / reps
    return out


def worker(rank: int, world: int, port: int, args, clip_path: str, out: str, ddp: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(args.threads)
    par = init_distributed(DistributedConfig(sync_bn=True), device=args.device)
    try:
        stats = one_run(args, clip_path, par)
        if par.is_main:
            save_tensors(out, {k: torch.tensor(v, dtype=torch.float64) for k, v in stats.items()})
    finally:
        shutdown()


def spawned(world: int, args, clip_path: str, tmp: Path) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"world{world}.safetensors"
    mp.spawn(worker, args=(world, port, args, clip_path, str(out), True), nprocs=world, join=True)
    return {k: float(v) for k, v in load_tensors(out)[0].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--ids", type=int, default=16)
    ap.add_argument("--per-id", type=int, default=8)
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[128, 64])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clip_path = str(ensure_tiny_clip(tmp / "tiny.pt", arch="vit", seed=0))
        plain = one_run(args, clip_path)
        world1 = spawned(1, args, clip_path, tmp)
        # world size 2 needs two devices on a GPU machine (each rank pins cuda:LOCAL_RANK)
        two = args.device == "cpu" or torch.cuda.device_count() >= 2
        world2 = spawned(2, args, clip_path, tmp) if two else None
    steps = plain["steps"]
    print(f"device {args.device}, {os.cpu_count()} CPUs, {args.threads} thread(s)/process, global batch {args.p}x{args.k}, "
          f"{int(steps)} steps/epoch, input {args.size[0]}x{args.size[1]}")
    runs = (("plain loop (world 1)", plain), ("DDP world 1", world1), ("DDP world 2 (SyncBN)", world2))
    for name, r in runs:
        if r is not None:
            print(f"{name:22s}: epoch {r['epoch_s']:.3f} s, {r['epoch_s'] / steps * 1e3:.1f} ms/step")
    if world2 is not None:
        share = world2["allreduce_s"] / (world2["epoch_s"] / steps)
        print(f"gradient all-reduce (world 2): {world2['allreduce_s'] * 1e3:.1f} ms per step")
        print(f"epoch time world2/world1: {world2['epoch_s'] / plain['epoch_s']:.2f}x")
        print(f"comm share per step (world 2): {100 * share:.1f}%")
    else:
        print("world size 2 skipped: fewer than 2 GPUs")
    print(f"DDP world1 / plain: {world1['epoch_s'] / plain['epoch_s']:.3f}x")


if __name__ == "__main__":
    main()
