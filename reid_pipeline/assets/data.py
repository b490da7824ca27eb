"""The ``dataset_manifest`` asset: one table of every usable image, versioned by its content."""


import io

import dagster as dg
from pydantic import Field

from reid_pipeline.assets._common import OWNERS, table_metadata
from reid_pipeline.assets.raw import raw_dataset
from reid_pipeline.data import build_manifest_with_report, manifest_fingerprint, summarize_manifest
from reid_pipeline.resources import ReidSettings
from reid_pipeline.storage import atomic_write_bytes

MANIFEST_CODE_VERSION = "1"


class DatasetManifestConfig(dg.Config):
    layout: str = Field(default="auto", description="auto | market1501 | dukemtmc | msmt17 | market_style")
    check_images: bool = Field(default=True, description="Cheap header/trailer check of every image.")
    on_bad_image: str = Field(default="error", description="error | skip (skipped images are listed in metadata)")


@dg.asset(
    deps=[raw_dataset],
    group_name="data",
    kinds={"pandas", "parquet"},
    owners=OWNERS,
    code_version=MANIFEST_CODE_VERSION,
    description="Every usable image of the dataset: path, pid, camid, split, label (parquet).",
)
def dataset_manifest(context: dg.AssetExecutionContext, config: DatasetManifestConfig, reid: ReidSettings) -> dg.Output[dict]:
    root = reid.data_root_path()
    context.log.info(f"building the manifest of {root} (layout={config.layout})")
    df, report = build_manifest_with_report(
        root, layout=config.layout, check_images=config.check_images, on_bad_image=config.on_bad_image
    )
    for warning in report.warnings:
        context.log.warning(warning)
    fingerprint = manifest_fingerprint(df, root)
    out_dir = reid.new_artifact_dir("dataset_manifest", context.run.run_id)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    manifest_path = atomic_write_bytes(out_dir / "manifest.parquet", buf.getvalue())
    summary = summarize_manifest(df)
    train = df[df.split == "train"]
    metadata: dict = {
        "root": dg.MetadataValue.path(str(root)),
        "layout": report.layout,
        "manifest": dg.MetadataValue.path(str(manifest_path)),
        "fingerprint": fingerprint,
        "num_images": len(df),
        "num_train_ids": int(train.pid.nunique()),
        "per_split": table_metadata(summary.reset_index()),
        "preview": table_metadata(df, 10),
        "skipped_unparseable_names": report.num_skipped,
        "junk_dropped": report.num_junk,
        "bad_images_skipped": len(report.bad_images),
        "dagster/row_count": len(df),
    }
    if report.bad_images:
        metadata["bad_image_paths"] = dg.MetadataValue.json([str(p) for p in report.bad_images[:100]])
    if report.skipped_examples:
        metadata["skipped_examples"] = dg.MetadataValue.json(list(report.skipped_examples))
    if report.warnings:
        metadata["warnings"] = dg.MetadataValue.json(list(report.warnings))
    descriptor = {
        "artifact_dir": str(out_dir),
        "manifest": str(manifest_path),
        "root": str(root),
        "layout": report.layout,
        "fingerprint": fingerprint,
        "num_classes": int(train.pid.nunique()),
        "label_to_pid": [int(p) for p in sorted(train.pid.unique())],
        "num_cameras": int(df.camid.max()) + 1 if len(df) else 0,
    }
    return dg.Output(descriptor, data_version=dg.DataVersion(fingerprint), metadata=metadata)
