"""The one job of the project: the whole pipeline, its observed sources first."""

from __future__ import annotations

import dagster as dg

from reid_pipeline.assets.raw import clip_weights, raw_dataset

#: Automatic runs (sensor, schedule) are launched as this job, restricted to what changed.
reid_job = dg.define_asset_job(
    "reid_pipeline_job",
    selection=dg.AssetSelection.all() | dg.AssetSelection.assets(raw_dataset, clip_weights),  # observes the sources first
    description="Materialise the whole CLIP-ReID pipeline: manifest → frozen CLIP → stage 1 → stage 2 → evaluation.",
)
