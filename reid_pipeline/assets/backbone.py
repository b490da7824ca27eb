"""The ``frozen_clip`` asset: OpenAI CLIP loaded through ``clip.load``, frozen, adapted to ReID inputs."""

from typing import Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import FrozenClipArtifact
from reid_pipeline.assets._common import OWNERS, output_dir
from reid_pipeline.assets.raw import clip_weights
from reid_pipeline.pipeline import frozen_clip_step
from reid_pipeline.resources import ReidSettings

FROZEN_CLIP_CODE_VERSION = "2"


class FrozenClipConfig(dg.Config):
    input_height: int = Field(default=256, description="ReID input height (pixels); the paper: 256.")
    input_width: int = Field(default=128, description="ReID input width (pixels); the paper: 128.")
    stride: Optional[int] = Field(
        default=None, description="ViT patch stride; below the patch size = overlapping patches (OLP, e.g. 12)."
    )


@dg.asset(deps=[clip_weights], group_name="backbone", kinds={"pytorch"}, owners=OWNERS,
          code_version=FROZEN_CLIP_CODE_VERSION,
          description="OpenAI CLIP via clip.load(..., jit=False), all parameters frozen, visual encoder adapted to "
                      "the ReID input size.")
def frozen_clip(context: dg.AssetExecutionContext, config: FrozenClipConfig,
                reid: ReidSettings) -> dg.Output[FrozenClipArtifact]:
    spec = reid.clip_weights_spec()
    context.log.info(f"loading CLIP from {spec}")
    artifact, model, info = frozen_clip_step(spec, output_dir(context, reid),
                                             input_size=(config.input_height, config.input_width), stride=config.stride)
    grid = str(tuple(getattr(model.visual, "grid_hw", ())))
    context.log.info(f"{info.name}: {info.arch}, {info.param_count:,} parameters, input {info.input_size}, grid {grid}")
    metadata = {
        "model_name": info.name, "source": dg.MetadataValue.path(info.source), "weights_sha256": info.sha256,
        "architecture": info.arch, "input_size": f"{info.input_size[0]}x{info.input_size[1]}",
        "patch_stride": info.stride if info.stride is not None else "n/a", "feature_grid": grid,
        "parameter_count": info.param_count, "embed_dim": info.embed_dim, "text_width": info.text_width,
    }
    return dg.Output(artifact, data_version=dg.DataVersion(artifact.clip.version), metadata=metadata)
