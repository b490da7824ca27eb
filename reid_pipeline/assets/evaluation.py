"""``reid_features`` and ``evaluation_metrics`` — the Market-1501 protocol on query × gallery."""

from pathlib import Path
from typing import Optional

import dagster as dg
import numpy as np
import torch
from pydantic import Field

from reid_pipeline.assets._common import OWNERS, png_metadata
from reid_pipeline.assets._inputs import image_cache, read_manifest, split_rows
from reid_pipeline.assets.backbone import load_frozen_clip
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.evaluation import evaluate_rank, pairwise_distance, re_ranking
from reid_pipeline.evaluation.plots import plot_cmc, plot_rank_list
from reid_pipeline.model.reid_model import ReIDModel, load_reid_model
from reid_pipeline.resources import ReidSettings, TrainingDevice
from reid_pipeline.storage import load_tensors, save_tensors, write_json
from reid_pipeline.training.extract import extract_features

FEATURES_CODE_VERSION = "1"
METRICS_CODE_VERSION = "1"
RANKS = (1, 5, 10)


class ReidFeaturesConfig(dg.Config):
    batch_size: int = Field(default=128, description="Images per forward pass.")


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch", "safetensors"},
    owners=OWNERS,
    code_version=FEATURES_CODE_VERSION,
    description="Query and gallery features of the fine-tuned encoder and of the frozen CLIP (baseline).",
)
def reid_features(
    context: dg.AssetExecutionContext,
    config: ReidFeaturesConfig,
    reid: ReidSettings,
    device: TrainingDevice,
    dataset_manifest: dict,
    frozen_clip: dict,
    visual_encoder: dict,
) -> dict:
    spec = device.spec()
    clip_model, info = load_frozen_clip(frozen_clip)
    model, _ = load_reid_model(visual_encoder["weights"], clip_model)
    baseline = ReIDModel.frozen_baseline(clip_model)
    manifest = read_manifest(dataset_manifest)
    mean, std = normalization_for(info.arch)
    transform = TestTransform(info.input_size, mean, std)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {"root": dataset_manifest["root"], "arch": info.arch}
    for split in ("query", "gallery"):
        rows = split_rows(manifest, split)
        cache = image_cache(reid, dataset_manifest, rows, context.log)
        cams = rows.camid.to_numpy() if model.num_cameras else None
        tensors[split] = extract_features(model, cache, None, transform, spec, config.batch_size, cam_ids=cams)
        tensors[f"baseline_{split}"] = extract_features(baseline, cache, None, transform, spec, config.batch_size)
        tensors[f"{split}_pids"] = torch.as_tensor(rows.pid.to_numpy(), dtype=torch.int64)
        tensors[f"{split}_camids"] = torch.as_tensor(rows.camid.to_numpy(), dtype=torch.int64)
        meta[f"{split}_paths"] = list(rows.path)
        context.log.info(f"{split}: {len(rows)} images → features {tuple(tensors[split].shape)}")
    out_dir = reid.new_artifact_dir("reid_features", context.run.run_id)
    path = save_tensors(out_dir / "features.safetensors", tensors, meta)
    context.add_output_metadata({
        "features": dg.MetadataValue.path(str(path)),
        "num_query": int(tensors["query"].shape[0]),
        "num_gallery": int(tensors["gallery"].shape[0]),
        "feature_dim": int(tensors["query"].shape[1]),
    })
    return {"artifact_dir": str(out_dir), "features": str(path), "root": dataset_manifest["root"]}


class EvaluationConfig(dg.Config):
    max_rank: int = 50
    rerank: bool = Field(default=True, description="Also evaluate with k-reciprocal re-ranking.")
    k1: int = 50
    k2: int = 15
    lambda_value: float = 0.3
    min_map: Optional[float] = Field(default=None, description="Fail the run (blocking check) below this mAP.")
    rank_list_queries: int = 6


def _summary(prefix: str, result: dict) -> dict[str, float]:
    out = {f"{prefix}mAP": float(result["mAP"]), f"{prefix}mINP": float(result["mINP"])}
    for r in RANKS:
        cmc = result["cmc"]
        out[f"{prefix}rank-{r}"] = float(cmc[min(r, len(cmc)) - 1])
    return out


@dg.asset(
    group_name="evaluation",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version=METRICS_CODE_VERSION,
    description="mAP, CMC and mINP (plain, re-ranked, and the frozen-CLIP baseline), CMC plot and rank lists.",
    check_specs=[
        dg.AssetCheckSpec("metrics_in_range", asset="evaluation_metrics", description="All metrics finite and in [0, 1]."),
        dg.AssetCheckSpec("query_and_gallery_non_empty", asset="evaluation_metrics"),
        dg.AssetCheckSpec("minimum_map", asset="evaluation_metrics", blocking=True,
                          description="mAP at least the configured min_map (when set)."),
    ],
)
def evaluation_metrics(context: dg.AssetExecutionContext, config: EvaluationConfig, reid: ReidSettings,
                       device: TrainingDevice, reid_features: dict):
    tensors, meta = load_tensors(reid_features["features"])
    q_pids, g_pids = tensors["query_pids"].numpy(), tensors["gallery_pids"].numpy()
    q_cams, g_cams = tensors["query_camids"].numpy(), tensors["gallery_camids"].numpy()
    spec = device.spec()

    def evaluate(query, gallery, prefix, rerank):
        dist = pairwise_distance(query, gallery)
        res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=config.max_rank)
        results = {prefix: res}
        if rerank:
            rr = re_ranking(query, gallery, k1=config.k1, k2=config.k2, lambda_value=config.lambda_value, device=spec.device)
            results[f"reranked_{prefix}"] = evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams, max_rank=config.max_rank)
        return dist, results

    dist, results = evaluate(tensors["query"], tensors["gallery"], "", config.rerank)
    _, baseline = evaluate(tensors["baseline_query"], tensors["baseline_gallery"], "baseline_", False)
    results.update(baseline)
    metrics: dict[str, float] = {}
    for prefix, res in results.items():
        metrics.update(_summary(prefix, res))
        context.log.info(f"{prefix.rstrip('_') or 'fine-tuned'}: mAP {res['mAP']:.4f}, rank-1 {res['cmc'][0]:.4f}, "
                         f"mINP {res['mINP']:.4f} over {res['num_valid_queries']} queries")

    out_dir = reid.new_artifact_dir("evaluation_metrics", context.run.run_id)
    cmc_png = plot_cmc({(k.rstrip("_") or "fine-tuned"): v["cmc"] for k, v in results.items()}, out_dir / "cmc.png")
    ranks_png = plot_rank_list(meta["query_paths"], meta["gallery_paths"], dist.cpu().numpy(), q_pids, g_pids, q_cams, g_cams,
                               root=meta["root"], out_path=out_dir / "rank_list.png", num_queries=config.rank_list_queries)
    record = {**metrics, "num_query": int(len(q_pids)), "num_gallery": int(len(g_pids)),
              "cmc": {k or "fine-tuned": np.asarray(v["cmc"]).tolist() for k, v in results.items()},
              "features": reid_features["features"]}
    metrics_path = write_json(out_dir / "metrics.json", record)
    write_json(Path(reid_features["artifact_dir"]) / "metrics.json", record)  # beside the features, too

    finite = all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())
    yield dg.Output(
        {"artifact_dir": str(out_dir), "metrics": str(metrics_path), **metrics},
        metadata={**{k: dg.MetadataValue.float(v) for k, v in metrics.items()},
                  "metrics_json": dg.MetadataValue.path(str(metrics_path)),
                  "cmc_curve": png_metadata(cmc_png), "rank_list": png_metadata(ranks_png)},
    )
    yield dg.AssetCheckResult(check_name="metrics_in_range", passed=bool(finite),
                              metadata={k: dg.MetadataValue.float(v) for k, v in metrics.items()})
    yield dg.AssetCheckResult(check_name="query_and_gallery_non_empty", passed=bool(len(q_pids) and len(g_pids)),
                              metadata={"num_query": len(q_pids), "num_gallery": len(g_pids)})
    if config.min_map is None:
        yield dg.AssetCheckResult(check_name="minimum_map", passed=True, metadata={"min_map": "not set"})
    else:
        yield dg.AssetCheckResult(check_name="minimum_map", passed=metrics["mAP"] >= config.min_map,
                                  severity=dg.AssetCheckSeverity.ERROR,
                                  metadata={"mAP": metrics["mAP"], "min_map": config.min_map})
