"""Automation and operations: what runs by itself, and how training shares one GPU.

What triggers what (the README's "Automation" section tells the same story for users):

1. ``reid_retrain_sensor`` polls the two source assets (``raw_dataset``, ``clip_weights``) by their
   cheap fingerprints. When a fingerprint differs from the version recorded last, it records an
   observation with the new version (the UI marks the consumers stale at once) and requests **one**
   run of ``reid_pipeline_job`` restricted to the changed sources and every asset below them that
   has been materialised before. An unchanged folder records and requests nothing. While a run that
   touches those assets is queued or in progress, the change waits for the next tick.
2. ``nightly_retrain_schedule`` (03:00 UTC) re-observes the sources, finds the stale assets (new input
   version or new ``code_version``) and requests one run of them and everything materialised below
   them; when everything is fresh the tick is skipped.

Automatic runs take their op config from the run-config preset named by ``REID_RUN_CONFIG`` (its
``ops:`` section, e.g. ``configs/ci.yaml``), so retraining uses the same settings as a manual run of
that preset; unset, the assets' defaults apply. Resources (data, weights, storage) come from the
``Definitions`` and their ``REID_*`` environment variables.

Both are RUNNING by default so that ``make ui`` demonstrates retraining; ``REID_AUTOMATION=off`` (set
before the code location loads) makes them STOPPED by default; a toggle in the UI is stored in the
instance and wins over the default.

One GPU: the training assets declare ``pool=GPU_POOL`` and ``op_tags=GPU_OP_TAGS``. The project's
``dagster_home/dagster.yaml`` limits every pool to one slot (``concurrency: pools: default_limit: 1``),
so a second run's training step waits until the first one's has finished. Under the Kubernetes
executor / run launcher the tags ask for one ``nvidia.com/gpu`` per training pod.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import dagster as dg
import yaml

from reid_pipeline.assets._common import OWNERS
from reid_pipeline.assets.raw import SOURCE_FINGERPRINTS
from reid_pipeline.resources import ReidSettings

__all__ = [
    "GPU_POOL",
    "GPU_OP_TAGS",
    "gpu_training_asset",
    "PIPELINE_JOB",
    "automation_default_status",
    "load_run_preset",
    "changed_source_observations",
    "retrain_selection",
    "stale_asset_keys",
    "runs_in_progress",
    "retrain_run_request",
    "retrain_sensor",
    "nightly_retrain_schedule",
    "AUTOMATION_SENSORS",
    "AUTOMATION_SCHEDULES",
]

#: The concurrency pool of every step that trains on the GPU (limit 1 in dagster_home/dagster.yaml).
GPU_POOL = "gpu"

#: Op tags for the training assets: under ``dagster-k8s`` (``k8s_job_executor`` or ``K8sRunLauncher``)
#: each training step's pod asks for one GPU and tolerates the usual GPU-node taint.
GPU_OP_TAGS: dict[str, object] = {
    "dagster-k8s/config": {
        "container_config": {
            "resources": {
                "limits": {"nvidia.com/gpu": "1"},
            }
        },
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}

def gpu_training_asset(**kwargs):
    """``@dg.asset`` for a training step: group ``training``, the ``gpu`` pool and the k8s GPU tags."""
    return dg.asset(group_name="training", kinds={"pytorch", "gpu", "safetensors"}, owners=OWNERS,
                    pool=GPU_POOL, op_tags=GPU_OP_TAGS, **kwargs)


#: The job automatic runs are launched as (defined in ``definitions.py``; it includes the sources).
PIPELINE_JOB = "reid_pipeline_job"

_DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster reads an observation's data version from
_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
_ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def automation_default_status() -> dg.DefaultSensorStatus:
    """RUNNING unless ``REID_AUTOMATION`` is ``off`` / ``0`` / ``false`` / ``no`` / ``stopped``."""
    value = os.environ.get("REID_AUTOMATION", "on").strip().lower()
    if value in {"off", "0", "false", "no", "stopped"}:
        return dg.DefaultSensorStatus.STOPPED
    if value in {"on", "1", "true", "yes", "running", ""}:
        return dg.DefaultSensorStatus.RUNNING
    raise ValueError(f"REID_AUTOMATION={value!r}: expected 'on' or 'off'")


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected a whole number of seconds") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r}: expected at least 1 second")
    return value


def load_run_preset(path: str | os.PathLike | None = None) -> dict:
    """The ``ops:`` section of a run-config preset (``path``, else ``$REID_RUN_CONFIG``; none → ``{}``).

    Raises:
        FileNotFoundError: the preset file does not exist.
        ValueError: it is not YAML with a mapping under ``ops``.
    """
    path = path if path is not None else os.environ.get("REID_RUN_CONFIG") or None
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"run-config preset {str(file)!r} (REID_RUN_CONFIG) does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"run-config preset {str(file)!r} is not valid YAML: {exc}") from None
    ops = data.get("ops", {}) if isinstance(data, dict) else None
    if not isinstance(ops, dict):
        raise ValueError(f"run-config preset {str(file)!r}: expected a mapping under 'ops', got {type(ops).__name__}")
    return ops


def _recorded(instance: dg.DagsterInstance, key: dg.AssetKey) -> tuple[str | None, int]:
    """The data version last recorded for source ``key`` and the storage id of that record (0: none)."""
    record = instance.get_latest_data_version_record(key, is_source=True)
    if record is None or record.asset_observation is None:
        return None, 0
    return record.asset_observation.tags.get(_DATA_VERSION_TAG), record.storage_id


def changed_source_observations(
    instance: dg.DagsterInstance, reid: ReidSettings, seen: dict[str, str] | None = None
) -> tuple[list[dg.AssetObservation], dict[str, str]]:
    """Fingerprint every source; observations for those whose version changed, and all fingerprints.

    A fingerprint equal to ``seen`` (a sensor cursor) or to the version recorded last in ``instance``
    yields no observation, so re-observing unchanged data records nothing. Each observation carries
    ``previous_record`` (the storage id of the record it supersedes), which makes run keys unique.
    """
    seen = seen or {}
    current: dict[str, str] = {}
    events: list[dg.AssetObservation] = []
    for key, fingerprint in SOURCE_FINGERPRINTS.items():
        name = key.to_user_string()
        version = fingerprint(reid)
        current[name] = version
        if seen.get(name) == version:
            continue
        recorded, storage_id = _recorded(instance, key)
        if recorded == version:
            continue
        events.append(
            dg.AssetObservation(
                asset_key=key,
                tags={_DATA_VERSION_TAG: version, _USER_PROVIDED_TAG: "true"},
                metadata={"fingerprint": version, "previous_version": recorded or "none", "previous_record": storage_id},
            )
        )
    return events, current


def _materialised(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]) -> set[dg.AssetKey]:
    keys = list(keys)
    return {record.asset_entry.asset_key for record in instance.get_asset_records(keys) if record.asset_entry.last_materialization_record}


def retrain_selection(asset_graph, instance: dg.DagsterInstance, roots: Iterable[dg.AssetKey]) -> list[dg.AssetKey]:
    """What retraining from ``roots`` runs: the observable roots (re-observed first) and every
    materialisable root or descendant that has been materialised before (sorted).

    Never-materialised assets are left out: the first, expensive build stays a deliberate action.
    """
    roots = [dg.AssetKey.from_coercible(r) for r in roots]
    below: set[dg.AssetKey] = set()
    frontier = set(roots)
    while frontier:
        children = {child for key in frontier for child in asset_graph.get(key).child_keys}
        frontier = children - below
        below |= children
    materialisable = {k for k in set(roots) | below if asset_graph.get(k).is_materializable}
    observed = {k for k in roots if asset_graph.get(k).is_observable}
    return sorted(observed | _materialised(instance, materialisable), key=lambda k: k.to_user_string())


def stale_asset_keys(instance: dg.DagsterInstance, asset_graph) -> set[dg.AssetKey]:
    """Materialisable assets Dagster marks STALE: an input's data version or their code version changed."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext  # noqa: PLC0415
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus  # noqa: PLC0415

    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=datetime.now(timezone.utc), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    resolver = CachingStaleStatusResolver(instance, asset_graph, view)
    return {k for k in asset_graph.materializable_asset_keys if resolver.get_status(k) == StaleStatus.STALE}


def runs_in_progress(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey]) -> list[str]:
    """Ids of queued or running runs that (may) touch any of ``keys``."""
    keys = set(keys)
    busy = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_ACTIVE_STATUSES)):
        if run.asset_selection is None or run.asset_selection & keys:
            busy.append(run.run_id)
    return busy


def retrain_run_request(
    asset_graph, selection: Sequence[dg.AssetKey], *, trigger: str, run_key: str | None = None
) -> dg.RunRequest | None:
    """One run of ``selection`` with the preset's op config for the selected assets (None: nothing to build)."""
    if not any(asset_graph.get(k).is_materializable for k in selection):
        return None
    preset = load_run_preset()
    names = {k.to_python_identifier() for k in selection}
    run_config = {"ops": {op: cfg for op, cfg in preset.items() if op in names}} if preset else {}
    tags = {"reid/trigger": trigger}
    if os.environ.get("REID_RUN_CONFIG"):
        tags["reid/run_config"] = os.environ["REID_RUN_CONFIG"]
    return dg.RunRequest(run_key=run_key, asset_selection=list(selection), run_config=run_config, tags=tags)


@dg.sensor(
    job_name=PIPELINE_JOB,
    name="reid_retrain_sensor",
    minimum_interval_seconds=_env_seconds("REID_OBSERVE_INTERVAL_S", 60),
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
        context.log.info(f"{event.asset_key.to_user_string()} changed: new version {event.tags[_DATA_VERSION_TAG][:12]}")
    run_key = hashlib.sha256(
        json.dumps(
            sorted((e.asset_key.to_user_string(), e.tags[_DATA_VERSION_TAG], e.metadata["previous_record"].value) for e in events)
        ).encode()
    ).hexdigest()[:24]
    request = retrain_run_request(graph, selection, trigger="source changed", run_key=run_key)
    return dg.SensorResult(asset_events=events, run_requests=[request] if request else [], cursor=cursor)


@dg.schedule(
    job_name=PIPELINE_JOB,
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


AUTOMATION_SENSORS: Sequence[dg.SensorDefinition] = [retrain_sensor]
AUTOMATION_SCHEDULES: Sequence[dg.ScheduleDefinition] = [nightly_retrain_schedule]
