"""``nightly_retrain_schedule``: catch what the sensor does not react to.

Nightly (``REID_RETRAIN_CRON``, default 03:00 UTC) it re-observes the sources, finds the stale assets
(new input version or new ``code_version``) and requests one run of them and everything materialised
below them, with the ``REID_RUN_CONFIG`` preset(s); when everything is fresh the tick is skipped.
"""

from __future__ import annotations

import os

import dagster as dg

from reid_pipeline.jobs import reid_job
from reid_pipeline.resources import ReidSettings
from reid_pipeline.retrain import (
    automation_default_status,
    changed_source_observations,
    retrain_run_request,
    retrain_selection,
    runs_in_progress,
    stale_asset_keys,
)

__all__ = ["nightly_retrain_schedule"]


@dg.schedule(
    job=reid_job,
    name="nightly_retrain_schedule",
    cron_schedule=os.environ.get("REID_RETRAIN_CRON", "0 3 * * *"),
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus(automation_default_status().value),
    description=(
        "Nightly (REID_RETRAIN_CRON, default 03:00 UTC): re-observes the sources, then one run of the stale assets and "
        "everything materialised below them, with the REID_RUN_CONFIG preset; skipped when everything is fresh."
    ),
)
def nightly_retrain_schedule(context: dg.ScheduleEvaluationContext, reid: ReidSettings) -> dg.RunRequest | dg.SkipReason:
    instance = context.instance
    events, _ = changed_source_observations(instance, reid)
    for event in events:
        instance.report_runless_asset_event(event)
        context.log.info(f"{event.asset_key.to_user_string()} changed since it was last observed")
    graph = context.repository_def.asset_graph
    roots = {e.asset_key for e in events} | stale_asset_keys(instance, graph)
    if not roots:
        return dg.SkipReason("everything is fresh")
    selection = retrain_selection(graph, instance, roots)
    busy = runs_in_progress(instance, selection)
    if busy:
        return dg.SkipReason(f"stale assets, but run(s) in progress: {', '.join(busy)}")
    request = retrain_run_request(graph, selection, trigger="nightly, stale")
    return request or dg.SkipReason("only never-materialised assets are affected")
