"""``nightly_retrain_schedule``: catch what the sensor does not react to.

Nightly (``REID_RETRAIN_CRON``, default 03:00 UTC) it re-observes the sources, finds the stale assets
of each dataset (new input version or new ``code_version``) and requests one run per dataset concerned,
of them and everything materialised below them, with the ``REID_RUN_CONFIG`` preset(s); when everything
is fresh the tick is skipped.
"""

from __future__ import annotations

import os

import dagster as dg

from reid_pipeline.jobs import reid_job
from reid_pipeline.resources import ReidSettings
from reid_pipeline.retrain import (
    automation_default_status,
    changed_source_observations,
    retrain_requests,
    runs_in_progress,
    stale_assets,
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
def nightly_retrain_schedule(context: dg.ScheduleEvaluationContext,
                             reid: ReidSettings) -> list[dg.RunRequest] | dg.SkipReason:
    instance = context.instance
    problems: list[str] = []
    events, _ = changed_source_observations(instance, reid, problems=problems)
    for problem in problems:
        context.log.warning(f"cannot observe {problem}")
    for event in events:
        instance.report_runless_asset_event(event)
        context.log.info(f"{event.asset_key.to_user_string()} {event.partition or ''} changed since it was last observed")
    graph = context.repository_def.asset_graph
    roots = stale_assets(instance, graph)
    for event in events:
        roots.setdefault(event.partition, set()).add(event.asset_key)
    if not roots:
        return dg.SkipReason("everything is fresh")
    requests = retrain_requests(graph, instance, roots, trigger="nightly, stale")
    if not requests:
        return dg.SkipReason("only never-materialised assets are affected")
    ready = []
    for request in requests:
        busy = runs_in_progress(instance, request.asset_selection, request.partition_key)
        if busy:
            context.log.info(f"{request.partition_key or 'shared assets'}: stale, but run(s) in progress: {', '.join(busy)}")
        else:
            ready.append(request)
    return ready or dg.SkipReason("stale assets, but run(s) in progress")
