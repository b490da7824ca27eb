"""``reid_retrain_sensor``: retrain when the data or the CLIP weights change.

Polls the two source assets (``raw_dataset``, ``clip_weights``) by their cheap fingerprints. When a
fingerprint differs from the version recorded last, it records an observation with the new version
(the UI marks the consumers stale at once) and requests **one** run of :data:`~reid_pipeline.jobs.reid_job`
restricted to the changed sources and every asset below them that has been materialised before, with
the ``REID_RUN_CONFIG`` preset(s). An unchanged folder records and requests nothing. While a run that
touches those assets is queued or in progress, the change waits for the next tick.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg

from reid_pipeline.jobs import reid_job
from reid_pipeline.resources import ReidSettings
from reid_pipeline.retrain import (
    DATA_VERSION_TAG,
    automation_default_status,
    changed_source_observations,
    env_seconds,
    retrain_run_request,
    retrain_selection,
    runs_in_progress,
)

__all__ = ["retrain_sensor"]


@dg.sensor(
    job=reid_job,
    name="reid_retrain_sensor",
    minimum_interval_seconds=env_seconds("REID_OBSERVE_INTERVAL_S", 60),
    default_status=automation_default_status(),
    description=(
        "Fingerprints raw_dataset and clip_weights (names, sizes, mtimes). On a change: records the new version and "
        "requests one run of the materialised assets below it, with the REID_RUN_CONFIG preset. "
        "Interval: REID_OBSERVE_INTERVAL_S (default 60 s)."
    ),
)
def retrain_sensor(context: dg.SensorEvaluationContext, reid: ReidSettings) -> dg.SensorResult | dg.SkipReason:
    try:
        seen = json.loads(context.cursor) if context.cursor else {}
    except json.JSONDecodeError:
        context.log.warning(f"ignoring an unreadable cursor {context.cursor!r}")
        seen = {}
    events, current = changed_source_observations(context.instance, reid, seen)
    cursor = json.dumps(current, sort_keys=True)
    if not events:
        return dg.SensorResult(skip_reason=dg.SkipReason("no source changed"), cursor=cursor)
    graph = context.repository_def.asset_graph
    selection = retrain_selection(graph, context.instance, [e.asset_key for e in events])
    busy = runs_in_progress(context.instance, selection)
    if busy:  # keep the old cursor: the change is picked up once those runs are done
        return dg.SkipReason(f"sources changed, waiting for run(s) in progress: {', '.join(busy)}")
    for event in events:
        context.log.info(f"{event.asset_key.to_user_string()} changed: new version {event.tags[DATA_VERSION_TAG][:12]}")
    run_key = hashlib.sha256(
        json.dumps(
            sorted((e.asset_key.to_user_string(), e.tags[DATA_VERSION_TAG], e.metadata["previous_record"].value) for e in events)
        ).encode()
    ).hexdigest()[:24]
    request = retrain_run_request(graph, selection, trigger="source changed", run_key=run_key)
    return dg.SensorResult(asset_events=events, run_requests=[request] if request else [], cursor=cursor)
