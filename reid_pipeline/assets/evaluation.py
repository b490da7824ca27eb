"""``reid_features`` and ``evaluation_metrics`` — the Market-1501 protocol on each dataset's query ×
gallery — and ``cross_domain_metrics``: every dataset's encoder tested on every dataset."""

from typing import Optional

import dagster as dg
import numpy as np
from pydantic import Field

from reid_pipeline.artifacts import CrossDomainArtifact, EncoderArtifact, FeaturesArtifact, ManifestArtifact
from reid_pipeline.assets._common import OWNERS, Overrides, output_dir, picture_metadata, table_metadata
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.pipeline import EvaluationSettings, cross_domain_step, features_step, metrics_step
from reid_pipeline.resources import ALL_DATASETS, ReidSettings, TrainingDevice

FEATURES_CODE_VERSION = "2"
METRICS_CODE_VERSION = "2"
CROSS_DOMAIN_CODE_VERSION = "1"


class ReidFeaturesConfig(dg.Config):
    batch_size: int = Field(default=128, description="Images per forward pass.")
    precision: str = Field(
        default="fp32", description="fp32 (as CLIP-ReID extracts test features) or 'train': the training precision.")


@dg.asset(partitions_def=dataset_partitions, group_name="evaluation", kinds={"pytorch", "safetensors"}, owners=OWNERS,
          code_version=FEATURES_CODE_VERSION,
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
    partitions_def=dataset_partitions, group_name="evaluation", kinds={"pytorch"}, owners=OWNERS,
    code_version=METRICS_CODE_VERSION,
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


class CrossDomainConfig(dg.Config):
    batch_size: int = Field(default=128, description="Images per forward pass.")
    max_rank: int = Field(default=50, description="CMC ranks computed.")


_ALL_DATASETS = dg.AssetIn(partition_mapping=dg.AllPartitionMapping(), metadata={ALL_DATASETS: True})


@dg.asset(group_name="evaluation", kinds={"pytorch"}, owners=OWNERS, code_version=CROSS_DOMAIN_CODE_VERSION,
          ins={"visual_encoder": _ALL_DATASETS, "dataset_manifest": _ALL_DATASETS},
          description="Cross-domain transfer: every dataset's fine-tuned encoder evaluated on every dataset's query × "
                      "gallery — the train × test matrices of mAP and rank-1 (table and heatmap; the diagonal is "
                      "in-domain). Datasets without a trained encoder are columns only.")
def cross_domain_metrics(context: dg.AssetExecutionContext, config: CrossDomainConfig, reid: ReidSettings,
                         device: TrainingDevice, visual_encoder: dict, dataset_manifest: dict) -> dg.Output[CrossDomainArtifact]:
    if not visual_encoder:
        known = ", ".join(dataset_partitions.get_partition_keys())
        raise dg.Failure(f"no dataset has a trained visual_encoder yet (datasets: {known}) — materialise visual_encoder "
                         "for at least one partition first")
    spec = device.spec().for_inference("fp32")
    artifact, report = cross_domain_step(visual_encoder, dataset_manifest, spec, output_dir(context, reid),
                                         cache_dir=reid.image_cache_dir(), batch_size=config.batch_size,
                                         max_rank=config.max_rank, log=context.log.info)
    untrained = sorted(set(dataset_manifest) - set(visual_encoder))
    table = report.table
    off = table[~table.in_domain]
    return dg.Output(artifact, metadata={
        "pairs": table_metadata(table.drop(columns=["in_domain"]), max_rows=100),
        "mAP_matrix": dg.MetadataValue.md(_markdown_matrix(artifact.train_datasets, artifact.test_datasets, artifact.mAP)),
        "rank1_matrix": dg.MetadataValue.md(_markdown_matrix(artifact.train_datasets, artifact.test_datasets,
                                                             artifact.rank1)),
        "mean_in_domain_mAP": float(table[table.in_domain].mAP.mean()) if table.in_domain.any() else float("nan"),
        "mean_cross_domain_mAP": float(off.mAP.mean()) if len(off) else float("nan"),
        "datasets_without_encoder": dg.MetadataValue.json(untrained),
        "matrix_json": dg.MetadataValue.path(artifact.matrix_file),
        **picture_metadata("heatmap", report.heatmap_png, max_side=480),
    })


def _markdown_matrix(rows: list[str], cols: list[str], values: list[list[float]]) -> str:
    head = "| trained on \\ tested on | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    lines += [f"| {r} | " + " | ".join(f"{v * 100:.1f}" for v in row) + " |" for r, row in zip(rows, values)]
    return "\n".join(lines)
