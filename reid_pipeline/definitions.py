"""The one ``Definitions`` object of the project (``workspace.yaml`` and ``[tool.dagster]`` load it)."""

from __future__ import annotations

import os

import dagster as dg

from reid_pipeline.assets.backbone import frozen_clip
from reid_pipeline.assets.data import dataset_manifest
from reid_pipeline.assets.evaluation import evaluation_metrics, reid_features
from reid_pipeline.assets.raw import clip_weights, raw_dataset
from reid_pipeline.assets.stage1 import prompt_checkpoint
from reid_pipeline.assets.stage2 import visual_encoder
from reid_pipeline.automation import AUTOMATION_SCHEDULES, AUTOMATION_SENSORS
from reid_pipeline.deploy import executor_from_env
from reid_pipeline.resources import (
    DEFAULT_CLIP_WEIGHTS,
    DEFAULT_DATA_ROOT,
    ArtifactIOManager,
    ReidSettings,
    TrainingDevice,
)


def _env_or(name: str, default: str):
    """``EnvVar(name)`` when the variable is set (shown as such in the UI), else the default."""
    return dg.EnvVar(name) if os.environ.get(name) else default


settings = ReidSettings(
    data_root=_env_or("REID_DATA_ROOT", DEFAULT_DATA_ROOT),
    clip_weights=_env_or("REID_CLIP_WEIGHTS", DEFAULT_CLIP_WEIGHTS),
    storage_dir=_env_or("REID_STORAGE_DIR", "artifacts"),
)

all_assets = [dataset_manifest, frozen_clip, prompt_checkpoint, visual_encoder, reid_features, evaluation_metrics]

reid_job = dg.define_asset_job(
    "reid_pipeline_job",
    selection=dg.AssetSelection.all() | dg.AssetSelection.assets(raw_dataset, clip_weights),  # observes the sources first
    description="Materialise the whole CLIP-ReID pipeline: manifest → frozen CLIP → stage 1 → stage 2 → evaluation.",
)

defs = dg.Definitions(
    # The observed sources, and the sensor/schedule that retrain when they or the code change (automation.py).
    assets=[raw_dataset, clip_weights, *all_assets],
    jobs=[reid_job],
    sensors=AUTOMATION_SENSORS,
    schedules=AUTOMATION_SCHEDULES,
    executor=executor_from_env(),  # REID_EXECUTOR: default (multiprocess) or k8s (reid_pipeline/deploy.py)
    resources={
        "reid": settings,
        "device": TrainingDevice(),
        "io_manager": ArtifactIOManager(),
    },
)
