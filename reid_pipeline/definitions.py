"""The one ``Definitions`` object of the project (``workspace.yaml``, ``[tool.dagster]`` and ``[tool.dg]`` load it)."""

from __future__ import annotations

import os

import dagster as dg

from reid_pipeline.assets.backbone import frozen_clip
from reid_pipeline.assets.data import dataset_manifest
from reid_pipeline.assets.evaluation import cross_domain_metrics, evaluation_metrics, reid_features
from reid_pipeline.assets.raw import clip_weights, raw_dataset
from reid_pipeline.assets.serving import gallery_index, onnx_encoder
from reid_pipeline.assets.training import prompt_checkpoint, visual_encoder
from reid_pipeline.deploy import executor_from_env
from reid_pipeline.jobs import reid_job
from reid_pipeline.operations import patch_pool_wait, patch_slot_claim, reap_dead_runs_sensor, reap_on_cli_start
from reid_pipeline.partitions import CONFIGURED_DATASETS
from reid_pipeline.resources import DEFAULT_CLIP_WEIGHTS, ArtifactIOManager, ReidSettings, TrainingDevice
from reid_pipeline.schedules import nightly_retrain_schedule
from reid_pipeline.sensors import retrain_sensor


def _env_or(name: str, default: str):
    """``EnvVar(name)`` when the variable is set (shown as such in the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


# A step waiting for a pool slot sleeps instead of spinning, a slot is claimed only while it is free (SQLite),
# and a CLI run first frees what dead runs hold.
patch_pool_wait()
patch_slot_claim()
reap_on_cli_start()

settings = ReidSettings(
    datasets=CONFIGURED_DATASETS,  # REID_DATASETS / REID_DATA_ROOT / the embedded two (reid_pipeline.partitions)
    clip_weights=_env_or("REID_CLIP_WEIGHTS", DEFAULT_CLIP_WEIGHTS),
    storage_dir=_env_or("REID_STORAGE_DIR", "artifacts"),
)

defs = dg.Definitions(
    assets=[raw_dataset, clip_weights, dataset_manifest, frozen_clip, prompt_checkpoint, visual_encoder,
            reid_features, evaluation_metrics, cross_domain_metrics, gallery_index, onnx_encoder],
    jobs=[reid_job],
    sensors=[retrain_sensor, reap_dead_runs_sensor],
    schedules=[nightly_retrain_schedule],
    executor=executor_from_env(),  # REID_EXECUTOR: default (multiprocess) or k8s (reid_pipeline/deploy.py)
    resources={"reid": settings, "device": TrainingDevice(), "io_manager": ArtifactIOManager(),
               # runs the torchrun launcher of the training assets (reid_pipeline.assets.launch)
               "pipes_subprocess_client": dg.PipesSubprocessClient()},
)
