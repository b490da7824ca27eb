"""``reid_retrain_sensor``: retrain when a dataset's folder or the CLIP weights change.

Polls the sources (``raw_dataset`` once per dataset partition, ``clip_weights``) by their cheap
fingerprints. When a fingerprint differs from the version recorded last, it records an observation
with the new version (the UI marks that dataset's consumers stale at once) and requests **one** run
per dataset concerned — a dataset's change concerns that dataset alone, new CLIP weights every dataset
— of :data:`~reid_pipeline.jobs.reid_job`, restricted to the changed sources and every asset below them
that has been materialised before (for that dataset), with the ``REID_RUN_CONFIG`` preset(s). An
unchanged folder records and requests nothing. While a run that touches a dataset's assets is queued or
in progress, that dataset's change waits for the next tick (a CLIP change waits for every dataset).
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
    retrain_requests,
    runs_in_progress,
    source_name,
)

__all__ = ["retrain_sensor"]


@dg.sensor(
    job=reid_job,
    name="reid_retrain_sensor",
    minimum_interval_seconds=env_seconds("REID_OBSERVE_INTERVAL_S", 60),
    default_status=automation_default_status(),
    description=(
        "Fingerprints each dataset's raw_dataset partition and clip_weights (names, sizes, mtimes). On a change: records "
        "the new version and requests one run per dataset concerned, of the materialised assets below it, with the "
        "REID_RUN_CONFIG preset. Interval: REID_OBSERVE_INTERVAL_S (default 60 s)."
    ),
)
def retrain_sensor(context: dg.SensorEvaluationContext, reid: ReidSettings) -> dg.SensorResult | dg.SkipReason:
    try:
        seen = json.loads(context.cursor) if context.cursor else {}
    except json.JSONDecodeError:
        context.log.warning(f"ignoring an unreadable cursor {context.cursor!r}")
        seen = {}
    problems: list[str] = []
    events, current = changed_source_observations(context.instance, reid, seen, problems=problems)
    for problem in problems:
        context.log.warning(f"cannot observe {problem}")
    current = {**seen, **current}  # a source that could not be observed keeps its last fingerprint
    if not events:
        reason = "no source changed" + (f" ({len(problems)} could not be observed: {'; '.join(problems)})" if problems else "")
        return dg.SensorResult(skip_reason=dg.SkipReason(reason), cursor=json.dumps(current, sort_keys=True))
    graph = context.repository_def.asset_graph
    by_partition: dict[str | None, set[dg.AssetKey]] = {}
    for event in events:
        by_partition.setdefault(event.partition, set()).add(event.asset_key)

    def touched(roots: dict[str | None, set[dg.AssetKey]]) -> set[dg.AssetKey]:
        return {k for r in retrain_requests(graph, context.instance, roots, trigger="") for k in r.asset_selection}

    waiting: dict[str | None, list[str]] = {}
    if None in by_partition:  # new CLIP weights concern every dataset: wait while any run touches what they retrain
        busy = runs_in_progress(context.instance, touched(by_partition))
        if busy:
            return dg.SkipReason(f"sources changed, waiting for run(s) in progress: {', '.join(busy)}")
    else:  # a dataset's change waits only for runs of that dataset
        for partition, keys in by_partition.items():
            busy = runs_in_progress(context.instance, touched({partition: keys}), partition)
            if busy:
                waiting[partition] = busy
    kept = [e for e in events if e.partition not in waiting]
    for event in events:  # a waiting dataset's change is picked up once its runs are done
        if event.partition in waiting:
            name = source_name(event.asset_key, event.partition)
            if name in seen:
                current[name] = seen[name]
            else:
                current.pop(name)
    if not kept:
        return dg.SkipReason(f"sources changed, waiting for run(s) in progress: "
                             f"{', '.join(sorted({r for runs in waiting.values() for r in runs}))}")
    for event in kept:
        context.log.info(f"{source_name(event.asset_key, event.partition)} changed: new version "
                         f"{event.tags[DATA_VERSION_TAG][:12]}")
    run_key = hashlib.sha256(json.dumps(sorted(
        (source_name(e.asset_key, e.partition), e.tags[DATA_VERSION_TAG], e.metadata["previous_record"].value) for e in kept
    )).encode()).hexdigest()[:24]
    roots: dict[str | None, set[dg.AssetKey]] = {}
    for event in kept:
        roots.setdefault(event.partition, set()).add(event.asset_key)
    requests = retrain_requests(graph, context.instance, roots, trigger="source changed", run_key=run_key)
    return dg.SensorResult(asset_events=kept, run_requests=requests, cursor=json.dumps(current, sort_keys=True))
