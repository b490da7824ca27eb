"""End-to-end library run on whatever device is there (GPU: bf16 autocast), no Dagster.

Builds the embedded synthetic data + small CLIP, trains stage 1 and stage 2, evaluates the
fine-tuned encoder against the frozen one, and checks re-ranking on the device against the CPU.
Prints a table; used for the lent-GPU check (CI never has a GPU).

    python benchmarks/gpu_smoke.py --root /tmp/emb --stage1-epochs 30 --stage2-epochs 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from reid_pipeline.data import build_manifest
from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.build import build_embedded
from reid_pipeline.evaluation import evaluate_rank, pairwise_distance, re_ranking
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.model.prompt import TextEncoder, encode_all_classes
from reid_pipeline.model.reid_model import ReIDModel
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.stage1 import Stage1Config, train_prompts
from reid_pipeline.training.stage2 import Stage2Config, build_reid_model, train_visual_encoder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default="data/embedded")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--stage1-epochs", type=int, default=30)
    ap.add_argument("--stage2-epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--size", type=int, nargs=2, default=(256, 128), metavar=("H", "W"), help="ReID input size")
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    paths = build_embedded(args.root)
    spec = resolve_device(args.device, "auto")
    print(f"device: {spec.describe()}", flush=True)
    df = build_manifest(paths["synthetic"])
    train, query, gallery = (df[df.split == s].reset_index(drop=True) for s in ("train", "query", "gallery"))
    clip_model, info = load_clip(str(paths["clip"]), input_size=tuple(args.size))
    caches = {s: ImageCache.from_paths(paths["synthetic"], list(r.path)).to(spec.device) for s, r in
              (("train", train), ("query", query), ("gallery", gallery))}
    mean, std = normalization_for(info.arch)
    test_tf = TestTransform(info.input_size, mean, std)
    rows.append(("setup (data, CLIP, caches)", time.perf_counter() - t0, ""))

    t = time.perf_counter()
    clip_model.to(spec.device)
    feats = extract_features(clip_model.encode_image, caches["train"], None, test_tf, spec)
    labels = torch.tensor(train.label.to_numpy())
    num_classes = int(labels.max()) + 1
    s1 = train_prompts(clip_model, feats, labels, num_classes, Stage1Config.paper("vit", epochs=args.stage1_epochs), spec)
    rows.append(("stage 1", time.perf_counter() - t,
                 f"loss {s1.loss_per_epoch[0]:.3f} -> {s1.final_loss:.3f}, {s1.samples_per_s:.0f} samples/s"))

    t = time.perf_counter()
    text_encoder = TextEncoder(clip_model).to(spec.device)
    with spec.autocast():
        text = encode_all_classes(s1.prompt_learner, text_encoder).float()
    cfg = Stage2Config.paper("vit", epochs=args.stage2_epochs, lr=args.lr, warmup_epochs=2,
                             steps=[int(args.stage2_epochs * 0.7)], input_size=tuple(args.size))
    model = build_reid_model(clip_model.cpu(), num_classes, cfg)
    s2 = train_visual_encoder(model, text, caches["train"], train.label.to_numpy(), train.camid.to_numpy(), cfg, spec)
    losses = [h["loss"] for h in s2.history]
    finite = all(np.isfinite(losses))
    rows.append(("stage 2", time.perf_counter() - t,
                 f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, finite {finite}, acc {s2.final_accuracy:.3f}, "
                 f"{s2.samples_per_s:.0f} img/s"))

    t = time.perf_counter()
    results = {}
    for name, net in (("fine-tuned", model), ("frozen", ReIDModel.frozen_baseline(clip_model))):
        q = extract_features(net, caches["query"], None, test_tf, spec)
        g = extract_features(net, caches["gallery"], None, test_tf, spec)
        r = evaluate_rank(pairwise_distance(q, g), query.pid, gallery.pid, query.camid, gallery.camid)
        results[name] = (q, g, r)
    rows.append(("evaluation", time.perf_counter() - t,
                 ", ".join(f"{k} mAP {v[2]['mAP']:.3f} R1 {v[2]['cmc'][0]:.3f}" for k, v in results.items())))

    q, g, _ = results["fine-tuned"]
    k1 = min(20, len(q) + len(g) - 1)
    t = time.perf_counter()
    rr_dev = re_ranking(q, g, k1=k1, k2=6, device=spec.device)
    t_dev = time.perf_counter() - t
    rr_cpu = re_ranking(q, g, k1=k1, k2=6, device="cpu")
    same = np.array_equal(np.argsort(rr_dev, axis=1, kind="stable"), np.argsort(rr_cpu, axis=1, kind="stable"))
    rows.append((f"re-ranking on {spec.device.type} vs cpu", t_dev,
                 f"max |diff| {np.abs(rr_dev - rr_cpu).max():.2e}, same ranking {same}"))

    print(f"{'step':<32}{'seconds':>9}  notes")
    for name, sec, note in rows:
        print(f"{name:<32}{sec:>9.2f}  {note}")
    ok = finite and results["fine-tuned"][2]["mAP"] > results["frozen"][2]["mAP"]
    print(f"gpu smoke: {'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
