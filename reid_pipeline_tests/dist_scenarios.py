"""Small training / extraction scenarios run once in-process (world size 1, the plain code path) and
once per rank of a gloo job started with ``torch.multiprocessing.spawn`` (CPU, 127.0.0.1 only)."""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from pathlib import Path

import torch

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform
from reid_pipeline.device import resolve_device
from reid_pipeline.evaluation.metrics import ReIDEvaluator
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.storage import save_tensors
from reid_pipeline.training.distributed import DistributedConfig, init_distributed, shutdown
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.stage1 import Stage1Config, train_prompts
from reid_pipeline.training.stage2 import Stage2Config, build_reid_model, train_visual_encoder

SIZE = (64, 32)
CPU = resolve_device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_small_clip(path: str | Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = load_clip(path, input_size=SIZE)
    return model


def image_data(ids: int = 8, per_id: int = 5):
    """``ids`` identities × ``per_id`` small uint8 images (identity colour + noise), two cameras."""
    g = torch.Generator().manual_seed(0)
    imgs, labels, cams = [], [], []
    for pid in range(ids):
        colour = torch.randint(0, 256, (3, 1, 1), generator=g)
        for j in range(per_id):
            noise = torch.randint(-40, 41, (3, 32, 16), generator=g)
            imgs.append((colour + noise).clamp(0, 255).to(torch.uint8))
            labels.append(pid)
            cams.append(j % 2)
    return ImageCache.from_tensors(imgs), torch.tensor(labels), torch.tensor(cams)


def stage1_run(clip_path, parallel=None) -> dict[str, torch.Tensor]:
    """37 precomputed 'image features' of 6 classes, global batch 8: the last batch (5) splits 3/2."""
    clip_model = load_small_clip(clip_path)
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(37) % 6
    feats = torch.randn(6, 128, generator=g)[labels] + 0.3 * torch.randn(37, 128, generator=g)
    cfg = Stage1Config(epochs=3, batch_size=8, warmup_epochs=1, lr=1e-3, seed=5)
    result = train_prompts(clip_model, feats, labels, 6, cfg, CPU, parallel=parallel)
    return {"cls_ctx": result.prompt_learner.cls_ctx.detach().clone(),
            "loss": torch.tensor(result.loss_per_epoch, dtype=torch.float64)}


def stage2_config(**kw) -> Stage2Config:
    base = dict(input_size=SIZE, epochs=2, ids_per_batch=4, instances_per_id=2, max_iters_per_epoch=3,
                lr=1e-4, warmup_epochs=1, steps=[2], log_period=1000)
    base.update(kw)
    return Stage2Config.paper("vit", **base)


def stage2_run(clip_path, parallel=None, state_path=None, **overrides) -> dict[str, torch.Tensor]:
    clip_model = load_small_clip(clip_path)
    cache, labels, cams = image_data()
    cfg = stage2_config(**overrides)
    model = build_reid_model(clip_model, 8, cfg)
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(8, 128, generator=g), dim=1)
    result = train_visual_encoder(model, text, cache, labels, cams, cfg, CPU, state_path=state_path, parallel=parallel)
    out = {k: v.clone() for k, v in model.state_tensors().items()}
    out["_loss"] = torch.tensor(result.loss_per_epoch, dtype=torch.float64)
    return out


def extract_run(clip_path, parallel=None) -> dict[str, torch.Tensor]:
    """Eval features of a freshly built ReIDModel over 40 images in batches of 7 (6 batches: 3/3)."""
    clip_model = load_small_clip(clip_path)
    cache, labels, cams = image_data()
    model = build_reid_model(clip_model, 8, stage2_config()).eval()
    feats = extract_features(model, cache, None, TestTransform(SIZE), CPU, batch_size=7, parallel=parallel)
    evaluator = ReIDEvaluator(max_rank=10, rerank=False)
    query = torch.arange(40) % 5 == 0
    evaluator.process(feats[query], labels[query].numpy(), cams[query].numpy(), "query")
    evaluator.process(feats[~query], labels[~query].numpy(), (1 - cams[~query]).numpy(), "gallery")
    metrics = evaluator.evaluate()
    return {"features": feats, "cmc": torch.as_tensor(metrics["cmc"], dtype=torch.float64),
            "mAP": torch.tensor(float(metrics["mAP"]), dtype=torch.float64)}


SCENARIOS = {"stage1": stage1_run, "stage2": stage2_run, "extract": extract_run}


def worker(rank: int, world: int, port: int, names: list[str], clip_path: str, out_dir: str, sync_bn: bool) -> None:
    """One rank: run each scenario and (rank 0) save its tensors as ``<out_dir>/<name>.safetensors``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    par = init_distributed(DistributedConfig(sync_bn=sync_bn), device="cpu")
    try:
        for name in names:
            if name == "stage2_local_bn":  # the same run without SyncBN: the fast-reid #54 trap
                local = dataclasses.replace(par, config=DistributedConfig(sync_bn=False))
                out = stage2_run(clip_path, local)
            else:
                out = SCENARIOS[name](clip_path, par)
            if par.is_main:
                save_tensors(Path(out_dir) / f"{name}.safetensors", out, {"world_size": world})
            par.barrier()
    finally:
        shutdown()


def run_spawned(world: int, names: list[str], clip_path, out_dir, sync_bn: bool = True) -> None:
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, free_port(), names, str(clip_path), str(out_dir), sync_bn), nprocs=world, join=True)
