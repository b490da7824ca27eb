"""``reid_features`` and ``evaluation_metrics`` — the Market-1501 protocol on query × gallery."""

from typing import Optional

import dagster as dg
import numpy as np
from pydantic import Field

from reid_pipeline.artifacts import EncoderArtifact, FeaturesArtifact, ManifestArtifact
from reid_pipeline.assets._common import OWNERS, Overrides, output_dir, picture_metadata
from reid_pipeline.pipeline import EvaluationSettings, features_step, metrics_step
from reid_pipeline.resources import ReidSettings, TrainingDevice

FEATURES_CODE_VERSION = "2"
METRICS_CODE_VERSION = "2"


class ReidFeaturesConfig(dg.Config):
    batch_size: int = Field(default=128, description="Images per forward pass.")
    precision: str = Field(
        default="fp32", description="fp32 (as CLIP-ReID extracts test features) or 'train': the training precision.")


@dg.asset(group_name="evaluation", kinds={"pytorch", "safetensors"}, owners=OWNERS, code_version=FEATURES_CODE_VERSION,
          description="Query and gallery features of the fine-tuned encoder and of the frozen CLIP (baseline).")
def reid_features(context: dg.AssetExecutionContext, config: ReidFeaturesConfig, reid: ReidSettings,
                  device: TrainingDevice, dataset_manifest: ManifestArtifact,
                  visual_encoder: EncoderArtifact) -> dg.Output[FeaturesArtifact]:
    spec = device.spec().for_inference(config.precision)
    artifact = features_step(dataset_manifest, visual_encoder, spec, output_dir(context, reid),
                             cache_dir=reid.image_cache_dir(), batch_size=config.batch_size, log=context.log.info)
    return dg.Output(artifact, metadata={"features": dg.MetadataValue.path(artifact.features),
                                         "feature_precision": artifact.precision})


class EvaluationConfig(Overrides):
    max_rank: Optional[int] = None
    rerank: Optional[bool] = Field(default=None, description="Also evaluate with k-reciprocal re-ranking (default on).")
    k1: Optional[int] = None
    k2: Optional[int] = None
    lambda_value: Optional[float] = None
    rank_list_queries: Optional[int] = None
    min_map: Optional[float] = Field(default=None, description="Fail the run (blocking check) below this mAP.")


@dg.asset(
    group_name="evaluation", kinds={"pytorch"}, owners=OWNERS, code_version=METRICS_CODE_VERSION,
    description="mAP, CMC and mINP (plain, re-ranked, and the frozen-CLIP baseline), CMC plot and rank lists.",
    check_specs=[
        dg.AssetCheckSpec("metrics_in_range", asset="evaluation_metrics", description="All metrics finite and in [0, 1]."),
        dg.AssetCheckSpec("every_query_has_a_match", asset="evaluation_metrics",
                          description="Every query has a true match (same pid, another camera) in the gallery; the "
                                      "protocol skips those that do not, so mAP would cover fewer queries."),
        dg.AssetCheckSpec("minimum_map", asset="evaluation_metrics", blocking=True,
                          description="mAP at least the configured min_map (when set)."),
    ],
)
def evaluation_metrics(context: dg.AssetExecutionContext, config: EvaluationConfig, reid: ReidSettings,
                       device: TrainingDevice, reid_features: FeaturesArtifact):
    settings = EvaluationSettings(**config.overrides(exclude={"min_map"}))
    artifact, report = metrics_step(reid_features, settings, output_dir(context, reid), device=device.spec().device)
    for line in report.lines:
        context.log.info(line)
    metrics = artifact.metrics
    yield dg.Output(artifact, metadata={
        **{k: dg.MetadataValue.float(v) for k, v in metrics.items()}, "feature_precision": reid_features.precision,
        "metrics_json": dg.MetadataValue.path(artifact.metrics_file),
        **picture_metadata("cmc_curve", report.cmc_png), **picture_metadata("rank_list", report.rank_list_png),
    })
    finite = all(np.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values())
    yield dg.AssetCheckResult(check_name="metrics_in_range", passed=bool(finite),
                              metadata={k: dg.MetadataValue.float(v) for k, v in metrics.items()})
    valid = int(report.results[""]["num_valid_queries"])
    yield dg.AssetCheckResult(check_name="every_query_has_a_match", passed=valid == report.num_query,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"num_query": report.num_query, "num_gallery": report.num_gallery,
                                        "num_valid_queries": valid, "queries_skipped": report.num_query - valid})
    passed = config.min_map is None or metrics["mAP"] >= config.min_map
    yield dg.AssetCheckResult(check_name="minimum_map", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                              metadata={"mAP": metrics["mAP"],
                                        "min_map": config.min_map if config.min_map is not None else "not set"})
