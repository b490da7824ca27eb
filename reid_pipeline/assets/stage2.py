"""``visual_encoder`` — CLIP-ReID stage 2: fine-tune the image encoder against frozen prompts."""

from typing import Optional

import dagster as dg
import torch
from pydantic import Field

from reid_pipeline.assets._common import png_metadata, version_of
from reid_pipeline.assets._inputs import image_cache, read_manifest, split_rows
from reid_pipeline.assets.backbone import load_frozen_clip
from reid_pipeline.automation import gpu_training_asset
from reid_pipeline.model.prompt import PromptLearner, TextEncoder, encode_all_classes, load_prompt_tokens
from reid_pipeline.model.reid_model import save_reid_model
from reid_pipeline.resources import ReidSettings, TrainingDevice
from reid_pipeline.training.stage2 import (
    Stage1MismatchError,
    Stage2Config,
    build_reid_model,
    plot_stage2_history,
    train_visual_encoder,
)

STAGE2_CODE_VERSION = "1"


class VisualEncoderConfig(dg.Config):
    max_epochs: int = Field(default=0, description="0 = the paper's preset (60 for ViT, 120 for ResNet).")
    base_lr: float = Field(default=0.0, description="0 = the paper's preset (5e-6 ViT, 3.5e-4 ResNet).")
    steps: Optional[list[int]] = Field(default=None, description="LR milestones; None = the paper's preset.")
    warmup_epochs: int = 10
    ids_per_batch: int = Field(default=16, description="P identities per batch.")
    instances_per_id: int = Field(default=4, description="K images per identity.")
    max_iters_per_epoch: Optional[int] = Field(default=None, description="Cap on iterations per epoch (smoke runs).")
    sie_camera: bool = Field(default=False, description="SIE: add a learned camera embedding to the class token.")
    sie_coe: float = 3.0
    seed: int = 1234

    def library_config(self, arch: str, stride: Optional[int], input_size: tuple[int, int]) -> Stage2Config:
        overrides = self.model_dump(exclude={"max_epochs", "base_lr", "steps"})
        if self.max_epochs:
            overrides["max_epochs"] = self.max_epochs
        if self.base_lr:
            overrides["base_lr"] = self.base_lr
        if self.steps is not None:
            overrides["steps"] = list(self.steps)
        return Stage2Config.paper(arch, stride=stride, input_size=tuple(input_size), **overrides)


def check_stage1_identities(prompt_checkpoint: dict, dataset_manifest: dict) -> None:
    """Stage 1 must have learned exactly the manifest's training identities, in the same order."""
    ours, theirs = list(dataset_manifest["label_to_pid"]), list(prompt_checkpoint["label_to_pid"])
    if ours != theirs or prompt_checkpoint.get("manifest_fingerprint") != dataset_manifest["fingerprint"]:
        added, removed = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise Stage1MismatchError(
            f"prompt_checkpoint {prompt_checkpoint['tokens']} was trained on {len(theirs)} identities of another "
            f"manifest (now {len(ours)}; new pids {added[:10]}, gone {removed[:10]}) — rematerialise "
            "prompt_checkpoint (stage 1) before stage 2"
        )


def load_text_features(prompt_checkpoint: dict, clip_model) -> torch.Tensor:
    """Frozen text features of every identity from the stage-1 tokens, computed once (no grad)."""
    learner = PromptLearner(
        prompt_checkpoint["num_classes"], clip_model, prompt_checkpoint["n_ctx"], prompt_checkpoint["template"]
    )
    load_prompt_tokens(learner, prompt_checkpoint["tokens"])
    return encode_all_classes(learner, TextEncoder(clip_model))


@gpu_training_asset(
    code_version=STAGE2_CODE_VERSION,
    description="Stage 2: the image encoder fine-tuned with ID + triplet + image-to-text losses; BNNecks and classifiers.",
)
def visual_encoder(
    context: dg.AssetExecutionContext,
    config: VisualEncoderConfig,
    reid: ReidSettings,
    device: TrainingDevice,
    dataset_manifest: dict,
    frozen_clip: dict,
    prompt_checkpoint: dict,
) -> dict:
    check_stage1_identities(prompt_checkpoint, dataset_manifest)
    spec = device.spec()
    clip_model, info = load_frozen_clip(frozen_clip)
    train = split_rows(read_manifest(dataset_manifest), "train")
    cfg = config.library_config(info.arch, frozen_clip.get("stride"), info.input_size)
    text_features = load_text_features(prompt_checkpoint, clip_model)
    model = build_reid_model(clip_model, prompt_checkpoint["num_classes"], cfg, num_cameras=dataset_manifest["num_cameras"])
    context.log.info(
        f"stage 2 on {spec.describe()}: {len(train)} images, {prompt_checkpoint['num_classes']} identities, "
        f"{cfg.max_epochs} epochs, P×K = {cfg.ids_per_batch}×{cfg.instances_per_id}"
    )
    cache = image_cache(reid, dataset_manifest, train, context.log)
    resume_key = version_of(dataset_manifest["fingerprint"], frozen_clip["version"], prompt_checkpoint["tokens"], cfg.fingerprint())
    state_path = reid.work_dir("visual_encoder", resume_key) / "state.safetensors"
    if state_path.exists():
        context.log.info(f"resuming stage 2 from {state_path}")
    result = train_visual_encoder(
        model, text_features, cache, train.label.to_numpy(), train.camid.to_numpy(), cfg, spec,
        state_path=state_path, log=context.log.info,
    )

    out_dir = reid.new_artifact_dir("visual_encoder", context.run.run_id)
    weights = save_reid_model(out_dir / "visual_encoder.safetensors", model.cpu(), {
        "label_to_pid": dataset_manifest["label_to_pid"],
        "clip": {"sha256": info.sha256, "name": info.name, "version": frozen_clip["version"]},
        "manifest_fingerprint": dataset_manifest["fingerprint"],
        "prompt_tokens": prompt_checkpoint["tokens"],
        "config": cfg.model_dump(mode="json"),
        "final_accuracy": result.final_accuracy,
    })
    plot = plot_stage2_history(result.history, out_dir / "stage2_losses.png")
    state_path.unlink(missing_ok=True)
    last = result.history[-1] if result.history else {}
    context.add_output_metadata({
        "weights": dg.MetadataValue.path(str(weights)),
        "final_accuracy": float(result.final_accuracy),
        "final_loss": float(last.get("loss", float("nan"))),
        "wall_time_s": float(result.wall_time_s),
        "images_per_s": float(result.images_per_second),
        "epochs": int(result.epochs_completed),
        "resumed_from_epoch": int(result.resumed_from_epoch),
        "loss_curves": png_metadata(plot),
    })
    return {
        "artifact_dir": str(out_dir),
        "weights": str(weights),
        "arch": info.arch,
        "num_classes": prompt_checkpoint["num_classes"],
        "sie_camera": cfg.sie_camera,
        "clip_version": frozen_clip["version"],
        "manifest_fingerprint": dataset_manifest["fingerprint"],
        "prompt_tokens": prompt_checkpoint["tokens"],
    }
