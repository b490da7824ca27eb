"""What a deployment serves: ``gallery_index`` (searchable gallery features) and ``onnx_encoder``."""

from typing import Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import EncoderArtifact, GalleryIndexArtifact, ManifestArtifact, OnnxArtifact
from reid_pipeline.assets._common import OWNERS, output_dir
from reid_pipeline.inference import ReIDPredictor, build_gallery_index, export_onnx, list_images
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.pipeline import read_manifest, split_rows
from reid_pipeline.resources import ReidSettings, TrainingDevice

SERVING_CODE_VERSION = "1"


class GalleryIndexConfig(dg.Config):
    folder: Optional[str] = Field(default=None, description="Index every image under this folder instead of the "
                                  "dataset's gallery split (ids/cameras read from Market-style names when they parse).")
    shard_size: int = Field(default=2048, description="Images per saved shard (the unit of resuming).")


def _predictor(visual_encoder: EncoderArtifact, device: TrainingDevice) -> ReIDPredictor:
    return ReIDPredictor.load(visual_encoder.artifact_dir, device=str(device.spec().device), precision="fp32")


@dg.asset(partitions_def=dataset_partitions, group_name="serving", kinds={"pytorch", "safetensors"}, owners=OWNERS,
          code_version=SERVING_CODE_VERSION,
          description="The searchable gallery (features, paths, ids, cameras) of the fine-tuned encoder — what "
                      "`reid-search query --index` and GalleryIndex.load serve.")
def gallery_index(context: dg.AssetExecutionContext, config: GalleryIndexConfig, reid: ReidSettings,
                  device: TrainingDevice, dataset_manifest: ManifestArtifact,
                  visual_encoder: EncoderArtifact) -> dg.Output[GalleryIndexArtifact]:
    predictor, out = _predictor(visual_encoder, device), output_dir(context, reid)
    if config.folder:
        images, ids, cams, root, source = list_images(config.folder), None, None, config.folder, config.folder
    else:
        rows = split_rows(read_manifest(dataset_manifest), "gallery")
        images = [str(dataset_manifest.folder_path(p)) for p in rows.path]
        ids, cams = rows.pid.to_numpy(), rows.camid.to_numpy()
        root, source = dataset_manifest.root, f"{dataset_manifest.root} (gallery split)"
    index = build_gallery_index(predictor, images, out / "index", ids=ids, camids=cams, root=root,
                                shard_size=config.shard_size, log=context.log.info)
    artifact = GalleryIndexArtifact(artifact_dir=str(out), index_dir=str(out / "index"), count=len(index), source=source,
                                    encoder_weights=visual_encoder.weights, encoder_fingerprint=predictor.fingerprint)
    return dg.Output(artifact, metadata={"index": dg.MetadataValue.path(artifact.index_dir), "count": artifact.count,
                                         "source": source, "encoder_fingerprint": predictor.fingerprint[:16]})


class OnnxEncoderConfig(dg.Config):
    opset: Optional[int] = Field(default=None, description="ONNX opset (default: the library's DEFAULT_OPSET).")
    check_images: int = Field(default=200, description="Gallery images the export is checked on (features and top-10).")
    atol: float = Field(default=1e-4, description="Max abs difference allowed on L2-normalised features.")


@dg.asset(partitions_def=dataset_partitions, group_name="serving", kinds={"onnx"}, owners=OWNERS,
          code_version=SERVING_CODE_VERSION,
          description="The fine-tuned image encoder in ONNX (dynamic batch), checked with onnxruntime against PyTorch "
                      "on real gallery images: features within atol and identical top-10.")
def onnx_encoder(context: dg.AssetExecutionContext, config: OnnxEncoderConfig, reid: ReidSettings,
                 dataset_manifest: ManifestArtifact, visual_encoder: EncoderArtifact) -> dg.Output[OnnxArtifact]:
    rows = split_rows(read_manifest(dataset_manifest), "gallery").head(config.check_images)
    gallery = [str(dataset_manifest.folder_path(p)) for p in rows.path]
    extra = {"opset": config.opset} if config.opset else {}
    out = output_dir(context, reid)
    report = export_onnx(visual_encoder.artifact_dir, out / "encoder.onnx", gallery_images=gallery, atol=config.atol, **extra)
    artifact = OnnxArtifact(artifact_dir=str(out), onnx=report["onnx_path"], opset=report["opset"],
                            encoder_weights=visual_encoder.weights, max_abs_diff=float(report["max_abs_diff"]),
                            topk_identical=bool(report.get("top_k_identical_up_to_ties", report.get("top_k_identical"))))
    context.log.info(f"exported {artifact.onnx} (opset {artifact.opset}): max |Δ| {artifact.max_abs_diff:.2e}, "
                     f"top-k identical: {artifact.topk_identical}")
    return dg.Output(artifact, metadata={"onnx": dg.MetadataValue.path(artifact.onnx), "opset": artifact.opset,
                                         "max_abs_diff": artifact.max_abs_diff, "topk_identical": artifact.topk_identical,
                                         "check_images": len(gallery), "bytes": int(report.get("bytes", 0))})
