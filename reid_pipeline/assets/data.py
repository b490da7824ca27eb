"""The ``dataset_manifest`` asset: one table of every usable image, versioned by its content."""

from typing import Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import ManifestArtifact
from reid_pipeline.assets._common import OWNERS, Overrides, output_dir, table_metadata
from reid_pipeline.assets.raw import raw_dataset
from reid_pipeline.partitions import dataset_partitions, partition_of
from reid_pipeline.pipeline import manifest_step, summary_table
from reid_pipeline.resources import ReidSettings

MANIFEST_CODE_VERSION = "2"


class DatasetManifestConfig(Overrides):
    layout: Optional[str] = Field(default=None, description="auto (default) | market1501 | dukemtmc | msmt17 | market_style")
    check_images: Optional[bool] = Field(default=None, description="Cheap header/trailer check of every image (default on).")
    on_bad_image: Optional[str] = Field(
        default=None, description="error (default) | skip (skipped images are listed in metadata)")


@dg.asset(deps=[raw_dataset], group_name="data", partitions_def=dataset_partitions, kinds={"pandas", "parquet"},
          owners=OWNERS, code_version=MANIFEST_CODE_VERSION,
          description="Every usable image of one dataset (partition): path, pid, camid, split, label (parquet).")
def dataset_manifest(context: dg.AssetExecutionContext, config: DatasetManifestConfig,
                     reid: ReidSettings) -> dg.Output[ManifestArtifact]:
    dataset = partition_of(context)
    root = reid.dataset_root(dataset)
    context.log.info(f"building the manifest of {dataset} at {root}")
    artifact, df, report = manifest_step(root, output_dir(context, reid), external_links=reid.external_links,
                                         dataset=dataset, **config.overrides())
    for warning in report.warnings:
        context.log.warning(warning)
    metadata = {
        "dataset": dataset, "root": dg.MetadataValue.path(str(root)), "layout": report.layout,
        "manifest": dg.MetadataValue.path(artifact.manifest), "fingerprint": artifact.fingerprint,
        "num_images": len(df), "num_train_ids": artifact.num_classes, "per_split": table_metadata(summary_table(df)),
        "preview": table_metadata(df, 10), "skipped_unparseable_names": report.num_skipped,
        "junk_dropped": report.num_junk, "external_links": reid.external_links,
        "external_links_found": report.num_external_links, "symlink_loops_left_out": report.num_symlink_loops,
        "bad_images_skipped": len(report.bad_images), "dagster/row_count": len(df),
        "bad_image_paths": dg.MetadataValue.json([str(p) for p in report.bad_images[:100]]),
        "skipped_examples": dg.MetadataValue.json(list(report.skipped_examples)),
        "warnings": dg.MetadataValue.json(list(report.warnings)),
    }
    return dg.Output(artifact, data_version=dg.DataVersion(artifact.fingerprint), metadata=metadata)
