"""``prompt_checkpoint`` — CLIP-ReID stage 1: learn one set of prompt tokens per identity."""

import dagster as dg
import torch
from pydantic import Field

from reid_pipeline.assets._common import line_plot_png, png_metadata, version_of
from reid_pipeline.assets._inputs import image_cache, read_manifest, split_rows
from reid_pipeline.assets.backbone import load_frozen_clip
from reid_pipeline.automation import gpu_training_asset
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.model.prompt import prompt_meta, prompt_state
from reid_pipeline.resources import ReidSettings, TrainingDevice
from reid_pipeline.storage import save_tensors
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.stage1 import Stage1Config, train_prompts

STAGE1_CODE_VERSION = "1"


class PromptCheckpointConfig(dg.Config):
    epochs: int = Field(default=0, description="0 = the paper's preset (120 for ViT, 60 for ResNet).")
    batch_size: int = 64
    lr: float = 3.5e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 5
    n_ctx: int = 4
    subject: str = Field(default="person", description="'person' or 'vehicle': the template's last word.")
    seed: int = 0
    checkpoint_every: int = Field(default=1, description="Epochs between resumable training-state saves.")

    def library_config(self, arch: str) -> Stage1Config:
        overrides = self.model_dump(exclude={"epochs"})
        if self.epochs:
            overrides["epochs"] = self.epochs
        return Stage1Config.paper(arch, **overrides)


def _log_epoch(context: dg.AssetExecutionContext):
    def log(row: dict) -> None:
        context.log.info(
            f"stage 1 epoch {row['epoch']}/{row['epochs']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['samples_per_s']:.0f} samples/s, avg positives {row['avg_positives']:.2f}, ETA {row['eta_s']:.0f}s"
        )
    return log


@gpu_training_asset(
    code_version=STAGE1_CODE_VERSION,
    description="Stage 1: class-specific prompt tokens learned against the frozen CLIP (SupCon i2t + t2i).",
)
def prompt_checkpoint(
    context: dg.AssetExecutionContext,
    config: PromptCheckpointConfig,
    reid: ReidSettings,
    device: TrainingDevice,
    dataset_manifest: dict,
    frozen_clip: dict,
) -> dict:
    spec = device.spec()
    clip_model, info = load_frozen_clip(frozen_clip)
    train = split_rows(read_manifest(dataset_manifest), "train")
    num_classes = int(dataset_manifest["num_classes"])
    cfg = config.library_config(info.arch)
    context.log.info(f"stage 1 on {spec.describe()}: {len(train)} images, {num_classes} identities, {cfg.epochs} epochs")

    cache = image_cache(reid, dataset_manifest, train, context.log)
    mean, std = normalization_for(info.arch)
    features = extract_features(
        clip_model.encode_image, cache, None, TestTransform(info.input_size, mean, std), spec
    )
    labels = torch.as_tensor(train.label.to_numpy(), dtype=torch.long)
    resume_key = version_of(dataset_manifest["fingerprint"], frozen_clip["version"], cfg.model_dump(exclude={"checkpoint_every"}))
    state_path = reid.work_dir("prompt_checkpoint", resume_key) / "state.safetensors"
    if state_path.exists():
        context.log.info(f"resuming stage 1 from {state_path}")
    result = train_prompts(
        clip_model, features, labels, num_classes, cfg, spec, state_path=state_path, log=_log_epoch(context)
    )

    out_dir = reid.new_artifact_dir("prompt_checkpoint", context.run.run_id)
    tokens_path = save_tensors(
        out_dir / "prompt_tokens.safetensors",
        prompt_state(result.prompt_learner),
        {
            **prompt_meta(result.prompt_learner),
            "label_to_pid": dataset_manifest["label_to_pid"],
            "clip": {"sha256": info.sha256, "name": info.name, "version": frozen_clip["version"]},
            "manifest_fingerprint": dataset_manifest["fingerprint"],
            "config": cfg.model_dump(),
            "final_loss": result.final_loss,
        },
    )
    plot = out_dir / "stage1_loss.png"
    plot.write_bytes(line_plot_png({"loss": result.loss_per_epoch}, "Stage 1 SupCon loss", "epoch", "loss"))
    state_path.unlink(missing_ok=True)  # finished: the resumable state is no longer needed
    context.add_output_metadata({
        "tokens": dg.MetadataValue.path(str(tokens_path)),
        "final_loss": float(result.final_loss),
        "avg_positives_per_sample": float(result.avg_positives),
        "wall_time_s": float(result.wall_time),
        "samples_per_s": float(result.samples_per_s),
        "epochs": len(result.loss_per_epoch),
        "resumed_from_epoch": int(result.resumed_from_epoch),
        "num_classes": num_classes,
        "loss_curve": png_metadata(plot),
    })
    return {
        "artifact_dir": str(out_dir),
        "tokens": str(tokens_path),
        "num_classes": num_classes,
        "label_to_pid": dataset_manifest["label_to_pid"],
        "template": result.prompt_learner.template,
        "n_ctx": cfg.n_ctx,
        "clip_version": frozen_clip["version"],
        "manifest_fingerprint": dataset_manifest["fingerprint"],
    }
