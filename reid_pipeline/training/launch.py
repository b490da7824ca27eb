"""The ``torchrun`` entry point: one pipeline step (stage 1, stage 2 or feature extraction) from files.

    torchrun --nproc-per-node 2 -m reid_pipeline.training.launch stage2 --config job.yaml

``job.yaml`` (or JSON; :class:`LaunchSpec`) names the input descriptors (``descriptor.json`` files or
their folders, read with :func:`~reid_pipeline.artifacts.load_descriptor`), the output folder, the
image-cache folder, the resumable state file, the stage's config, the device and the distributed
settings. No Dagster instance is needed. Every rank runs the same library step
(:mod:`reid_pipeline.pipeline`) with a :class:`~reid_pipeline.training.distributed.Parallel`; rank 0
alone writes checkpoints, artefacts, the descriptor and ``launch_result.json`` (what the step
measured), and — only when Dagster Pipes started the job — reports its logs and the materialisation
(metadata + descriptor path) through ``dagster-pipes``. Started without ``torchrun`` it runs as one
plain process.

Exit status: 0 on success; an exception propagates (``torch.distributed.elastic``'s ``@record``
writes it to the error file ``torchrun`` names in its failure summary, with the rank).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.distributed.elastic.multiprocessing.errors import record

from reid_pipeline.artifacts import (
    EncoderArtifact,
    FrozenClipArtifact,
    ManifestArtifact,
    PromptArtifact,
    load_descriptor,
    validation_problems,
)
from reid_pipeline.device import resolve_device
from reid_pipeline.storage import write_json
from reid_pipeline.training.distributed import DistributedConfig, init_distributed, shutdown, torchrun_env_present
from reid_pipeline.training.stage1 import Stage1Config
from reid_pipeline.training.stage2 import Stage2Config

__all__ = ["STAGES", "RESULT_FILE", "DeviceSettings", "LaunchSpec", "LaunchError", "read_spec", "run", "main"]

STAGES = ("stage1", "stage2", "features")
RESULT_FILE = "launch_result.json"
PIPES_CONTEXT_ENV = "DAGSTER_PIPES_CONTEXT"


class LaunchError(ValueError):
    """A launch spec that cannot run (missing input, wrong stage, unreadable file)."""


class DeviceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str = Field("auto", description="auto | cpu | cuda (each rank uses cuda:LOCAL_RANK)")
    precision: str = Field("auto", description="auto | fp32 | bf16 | fp16")
    num_threads: int = Field(0, ge=0, description="torch CPU threads per rank (0 = torch's default)")


class LaunchSpec(BaseModel):
    """What one launch runs; paths are absolute or relative to the working directory."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["stage1", "stage2", "features"]
    inputs: dict[str, str] = Field(description="dataset_manifest, frozen_clip (stage 1/2), prompt_checkpoint "
                                               "(stage 2), visual_encoder (features): descriptor paths")
    out_dir: str
    cache_dir: str
    state_path: str | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="Stage1Config / Stage2Config fields; "
                                                                       "features: batch_size")
    device: DeviceSettings = Field(default_factory=DeviceSettings)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    def descriptor(self, name: str, kind):
        if name not in self.inputs:
            raise LaunchError(f"{self.stage} needs inputs.{name} (a descriptor path); got inputs {sorted(self.inputs)}")
        return load_descriptor(self.inputs[name], kind)


def read_spec(path: str | os.PathLike, stage: str | None = None) -> LaunchSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LaunchError(f"{path}: cannot read the launch config ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise LaunchError(f"{path}: not YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"{path}: expected a mapping, got {type(data).__name__}")
    if stage is not None:
        if data.setdefault("stage", stage) != stage:
            raise LaunchError(f"{path}: says stage {data['stage']!r} but the command line says {stage!r}")
    try:
        return LaunchSpec.model_validate(data)
    except ValidationError as exc:
        raise LaunchError(f"{path}: invalid launch config ({validation_problems(exc)})") from None


def _pipes():
    """The Dagster Pipes context when Pipes started this job (rank 0 calls this), else a null context."""
    if not os.environ.get(PIPES_CONTEXT_ENV):
        return contextlib.nullcontext(None)
    from dagster_pipes import open_dagster_pipes

    return open_dagster_pipes()


def _warm_caches(spec: LaunchSpec, splits: tuple[str, ...], log) -> None:
    """Decode the image caches once (rank 0) so that the ranks do not build the same files at once."""
    from reid_pipeline.pipeline import image_cache, read_manifest, split_rows

    manifest = spec.descriptor("dataset_manifest", ManifestArtifact)
    df = read_manifest(manifest)
    for split in splits:
        image_cache(manifest, split_rows(df, split), Path(spec.cache_dir), log)


def _loop_summary(result) -> dict[str, Any]:
    return {
        "history": result.history, "epochs": result.epochs, "epochs_completed": result.epochs_completed,
        "completed": result.completed, "resumed_from_epoch": result.resumed_from_epoch,
        "wall_time_s": result.wall_time_s, "samples_per_s": result.samples_per_s, "iterations": result.iterations,
        "final_loss": result.final_loss, "precision": result.precision,
    }


def run(spec: LaunchSpec, log=print) -> dict[str, Any] | None:
    """Run ``spec`` on this rank; rank 0 returns what it wrote and measured (other ranks: ``None``)."""
    import torch

    from reid_pipeline.pipeline import encoder_step, features_step, prompts_step

    if spec.device.num_threads:
        torch.set_num_threads(spec.device.num_threads)
    parallel = init_distributed(spec.distributed, spec.device.device) if torchrun_env_present() else None
    try:
        main_rank = parallel is None or parallel.is_main
        say = log if main_rank else (lambda _m: None)
        device = str(parallel.device) if parallel is not None else spec.device.device
        dspec = resolve_device(device, spec.device.precision)
        world = parallel.world_size if parallel is not None else 1
        say(f"{spec.stage}: world size {world}" + (f" ({parallel.backend}, rank 0 on {parallel.device})" if parallel else ""))
        if main_rank:
            _warm_caches(spec, ("query", "gallery") if spec.stage == "features" else ("train",), say)
        if parallel is not None:
            parallel.barrier()
        out_dir, cache_dir = Path(spec.out_dir), Path(spec.cache_dir)
        state = Path(spec.state_path) if spec.state_path else None
        manifest = spec.descriptor("dataset_manifest", ManifestArtifact)
        summary: dict[str, Any] = {"stage": spec.stage, "world_size": world,
                                   "backend": parallel.backend if parallel else None}
        if spec.stage == "features":
            encoder = spec.descriptor("visual_encoder", EncoderArtifact)
            fspec = dspec.for_inference(spec.config.get("precision", "fp32"))
            artifact = features_step(manifest, encoder, fspec, out_dir, cache_dir=cache_dir,
                                     batch_size=int(spec.config.get("batch_size", 128)), log=say, parallel=parallel)
        else:
            frozen = spec.descriptor("frozen_clip", FrozenClipArtifact)
            if spec.stage == "stage1":
                artifact, result, report = prompts_step(manifest, frozen, Stage1Config(**spec.config), dspec, out_dir,
                                                        cache_dir=cache_dir, state_path=state, log=say, parallel=parallel)
                if main_rank:
                    summary.update(avg_positives=result.avg_positives, tokens=artifact.tokens,
                                   image_to_prompt_accuracy=report["image_to_prompt_accuracy"],
                                   loss_curve=str(report["loss_curve"]))
            else:
                prompts = spec.descriptor("prompt_checkpoint", PromptArtifact)
                artifact, result, report = encoder_step(manifest, frozen, prompts, Stage2Config(**spec.config), dspec,
                                                        out_dir, cache_dir=cache_dir, state_path=state, log=say,
                                                        parallel=parallel)
                if main_rank:
                    summary.update(final_accuracy=result.final_accuracy, final_id_accuracy=result.final_id_accuracy,
                                   weights=artifact.weights, loss_curves=str(report["loss_curves"]))
            if main_rank:
                summary.update(_loop_summary(result))
        if not main_rank:
            return None
        summary["descriptor"] = str(artifact.save())
        summary["device"] = dspec.describe() + (f" × {world} ranks ({parallel.backend})" if parallel else "")
        write_json(out_dir / RESULT_FILE, summary)
        return summary
    finally:
        if parallel is not None:
            shutdown()


@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_pipeline.training.launch", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--config", required=True, help="the launch spec (YAML or JSON)")
    args = parser.parse_args(argv)
    spec = read_spec(args.config, args.stage)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with (_pipes() if rank0 else contextlib.nullcontext(None)) as pipes:
        def log(message: str) -> None:
            print(message, flush=True)
            if pipes is not None:
                pipes.log.info(message)

        summary = run(spec, log)
        if pipes is not None and summary is not None:
            pipes.report_asset_materialization(metadata={
                "launch_result": {"raw_value": json.loads(json.dumps(summary, default=float)), "type": "json"},
                "descriptor": {"raw_value": summary["descriptor"], "type": "path"},
            })
    return 0


if __name__ == "__main__":
    sys.exit(main())
