"""The ``frozen_clip`` asset: OpenAI CLIP loaded through ``clip.load``, frozen, adapted to ReID inputs."""


from typing import Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.assets._common import OWNERS, version_of
from reid_pipeline.assets.raw import clip_weights
from reid_pipeline.model.clip_loader import ClipWeightsError, load_clip
from reid_pipeline.resources import ReidSettings

FROZEN_CLIP_CODE_VERSION = "1"


class FrozenClipConfig(dg.Config):
    input_height: int = Field(default=256, description="ReID input height (pixels).")
    input_width: int = Field(default=128, description="ReID input width (pixels).")
    stride: Optional[int] = Field(
        default=None, description="ViT patch stride; below the patch size = overlapping patches (OLP, e.g. 12)."
    )


def load_frozen_clip(descriptor: dict):
    """Reload the frozen CLIP a ``frozen_clip`` descriptor describes, checking its weights' checksum."""
    info = descriptor["info"]
    model, loaded = load_clip(info["source"], input_size=tuple(info["input_size"]), stride=descriptor.get("stride"))
    if loaded.sha256 != info["sha256"]:
        raise ClipWeightsError(
            f"{info['source']}: weights changed since frozen_clip was materialised "
            f"(sha256 {loaded.sha256[:12]}…, recorded {info['sha256'][:12]}…) — rematerialise frozen_clip"
        )
    return model, loaded


@dg.asset(
    deps=[clip_weights],
    group_name="backbone",
    kinds={"pytorch"},
    owners=OWNERS,
    code_version=FROZEN_CLIP_CODE_VERSION,
    description="OpenAI CLIP via clip.load(..., jit=False), all parameters frozen, visual encoder adapted to the ReID input size.",
)
def frozen_clip(context: dg.AssetExecutionContext, config: FrozenClipConfig, reid: ReidSettings) -> dg.Output[dict]:
    spec = reid.clip_weights_spec()
    context.log.info(f"loading CLIP from {spec}")
    model, info = load_clip(spec, input_size=(config.input_height, config.input_width), stride=config.stride)
    version = version_of(info.sha256, info.input_size, info.stride)
    context.log.info(
        f"{info.name}: {info.arch}, {info.param_count:,} parameters, input {info.input_size}, "
        f"grid {getattr(model.visual, 'grid_hw', None)}, sha256 {info.sha256[:12]}"
    )
    out_dir = reid.new_artifact_dir("frozen_clip", context.run.run_id)
    descriptor = {"artifact_dir": str(out_dir), "info": info.to_dict(), "stride": config.stride, "version": version}
    metadata = {
        "model_name": info.name,
        "source": dg.MetadataValue.path(info.source),
        "weights_sha256": info.sha256,
        "architecture": info.arch,
        "input_size": f"{info.input_size[0]}x{info.input_size[1]}",
        "patch_stride": info.stride if info.stride is not None else "n/a",
        "feature_grid": str(tuple(getattr(model.visual, "grid_hw", ()))),
        "parameter_count": info.param_count,
        "embed_dim": info.embed_dim,
        "text_width": info.text_width,
    }
    return dg.Output(descriptor, data_version=dg.DataVersion(version), metadata=metadata)
