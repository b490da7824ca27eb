"""The training assets: ``prompt_checkpoint`` (CLIP-ReID stage 1) and ``visual_encoder`` (stage 2).

Both run in the ``gpu`` pool with the k8s GPU tags (:func:`training_asset`), resume from their
last checkpoint when rematerialised after a crash, report the same metadata keys, and carry a
``loss_decreased`` check that fails when training diverged (last epoch's loss above the first's).
"""


from typing import Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import FrozenClipArtifact, ManifestArtifact, PromptArtifact
from reid_pipeline.assets._common import OWNERS, output_dir, picture_metadata, resume_state, training_metadata
from reid_pipeline.assets.launch import Launchable, run_encoder_step, run_prompts_step
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.pools import GPU_OP_TAGS, GPU_POOL
from reid_pipeline.resources import ReidSettings, TrainingDevice
from reid_pipeline.training.stage1 import Stage1Config
from reid_pipeline.training.stage2 import Stage2Config

STAGE1_CODE_VERSION = "2"
STAGE2_CODE_VERSION = "2"


def training_asset(name: str, **kwargs):
    """``@dg.asset`` for a training step: one partition per dataset, group ``training``, the ``gpu`` pool,
    the k8s GPU tags and the ``loss_decreased`` check."""
    check = dg.AssetCheckSpec("loss_decreased", asset=name,
                              description="Training did not diverge: the last epoch's loss is below the first's.")
    return dg.asset(name=name, group_name="training", kinds={"pytorch", "gpu", "safetensors"}, owners=OWNERS,
                    partitions_def=dataset_partitions, pool=GPU_POOL, op_tags=GPU_OP_TAGS, check_specs=[check], **kwargs)


def _loss_check(context: dg.AssetExecutionContext, result) -> dg.AssetCheckResult:
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    passed = bool(last < first) if len(result.history) > 1 else True
    if not passed:
        context.log.warning(f"training diverged: loss {first:.4f} in the first epoch, {last:.4f} in the last — "
                            "check the learning rate")
    return dg.AssetCheckResult(check_name="loss_decreased", passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                               metadata={"first_epoch_loss": float(first), "last_epoch_loss": float(last)})


class PromptCheckpointConfig(Launchable):
    """Stage-1 overrides; unset = the paper (120 epochs ViT / 60 RN50, batch 64, Adam 3.5e-4, 5 warm-up epochs)."""

    epochs: Optional[int] = Field(default=None, description="Default: 120 (ViT-B/16) or 60 (RN50), as the paper.")
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[int] = None
    n_ctx: Optional[int] = None
    subject: Optional[str] = Field(default=None, description="person | vehicle: the template's last word.")
    seed: Optional[int] = None
    checkpoint_every: Optional[int] = Field(default=None, description="Epochs between resumable saves (default 1).")

    def library_config(self, arch: str) -> Stage1Config:
        return Stage1Config.paper(arch, **self.overrides())


@training_asset("prompt_checkpoint", code_version=STAGE1_CODE_VERSION,
                description="Stage 1: class-specific prompt tokens learned against the frozen CLIP (SupCon i2t + t2i).")
def prompt_checkpoint(context: dg.AssetExecutionContext, config: PromptCheckpointConfig, reid: ReidSettings,
                      device: TrainingDevice, pipes_subprocess_client: dg.PipesSubprocessClient,
                      dataset_manifest: ManifestArtifact, frozen_clip: FrozenClipArtifact):
    spec, cfg = device.spec(), config.library_config(frozen_clip.clip.arch)
    with resume_state(context, reid, dataset_manifest.fingerprint, frozen_clip.clip.version,
                      cfg.model_dump(exclude={"checkpoint_every"}), spec.precision) as state:
        artifact, result, report = run_prompts_step(context, config.launcher, pipes_subprocess_client,
                                                    dataset_manifest, frozen_clip, cfg, spec, output_dir(context, reid),
                                                    cache_dir=reid.image_cache_dir(), state_path=state, log=context.log.info)
    yield dg.Output(artifact, metadata={
        **training_metadata(result, spec.describe()), "tokens": dg.MetadataValue.path(artifact.tokens),
        "avg_positives_per_sample": float(result.avg_positives), "num_classes": artifact.num_classes,
        "image_to_prompt_accuracy": float(report["image_to_prompt_accuracy"]),
        **picture_metadata("loss_curve", report["loss_curve"]),
    })
    yield _loss_check(context, result)


class VisualEncoderConfig(Launchable):
    """Stage-2 overrides; unset = the paper (ViT-B/16: 60 epochs, lr 5e-6, steps [30, 50]; RN50: 120, 3.5e-4, [40, 70])."""

    epochs: Optional[int] = None
    lr: Optional[float] = None
    steps: Optional[list[int]] = Field(default=None, description="LR milestones (epochs).")
    warmup_epochs: Optional[int] = None
    ids_per_batch: Optional[int] = Field(default=None, description="P identities per batch (paper: 16).")
    instances_per_id: Optional[int] = Field(default=None, description="K images per identity (paper: 4).")
    max_iters_per_epoch: Optional[int] = Field(default=None, description="Cap on iterations per epoch (smoke runs).")
    sie_camera: Optional[bool] = Field(default=None, description="SIE: a learned camera embedding on the class token.")
    sie_coe: Optional[float] = Field(
        default=None, description="SIE coefficient; default 3.0 (CLIP-ReID's config); its published SIE+OLP command uses 1.0.")
    erase_p: Optional[float] = Field(
        default=None, description="Random-erasing probability, 0..1 (paper: 0.5; torchreid's random_erase).")
    seed: Optional[int] = None
    checkpoint_every: Optional[int] = None

    def library_config(self, frozen: FrozenClipArtifact) -> Stage2Config:
        ref = frozen.clip
        return Stage2Config.paper(ref.arch, stride=ref.stride, input_size=tuple(ref.input_size), **self.overrides())


@training_asset("visual_encoder", code_version=STAGE2_CODE_VERSION,
                description="Stage 2: the image encoder fine-tuned with ID + triplet + image-to-text losses; BNNecks "
                            "and classifiers.")
def visual_encoder(context: dg.AssetExecutionContext, config: VisualEncoderConfig, reid: ReidSettings,
                   device: TrainingDevice, pipes_subprocess_client: dg.PipesSubprocessClient,
                   dataset_manifest: ManifestArtifact, frozen_clip: FrozenClipArtifact, prompt_checkpoint: PromptArtifact):
    spec, cfg = device.spec(), config.library_config(frozen_clip)
    with resume_state(context, reid, dataset_manifest.fingerprint, frozen_clip.clip.version,
                      prompt_checkpoint.tokens, cfg.fingerprint(), spec.precision) as state:
        artifact, result, report = run_encoder_step(context, config.launcher, pipes_subprocess_client,
                                                    dataset_manifest, frozen_clip, prompt_checkpoint, cfg, spec,
                                                    output_dir(context, reid), cache_dir=reid.image_cache_dir(),
                                                    state_path=state, log=context.log.info)
    yield dg.Output(artifact, metadata={
        **training_metadata(result, spec.describe()), "weights": dg.MetadataValue.path(artifact.weights),
        "final_accuracy": float(result.final_accuracy), "num_classes": artifact.num_classes,
        **picture_metadata("loss_curves", report["loss_curves"]),
    })
    yield _loss_check(context, result)


__all__ = ["training_asset", "prompt_checkpoint", "visual_encoder", "PromptCheckpointConfig", "VisualEncoderConfig"]
