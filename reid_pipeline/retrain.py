"""What retraining runs, shared by the sensor and the schedule (Dagster side).

* :func:`changed_source_observations` — fingerprint the sources (every dataset's folder on its own);
  observations for those whose version changed;
* :func:`retrain_selection` — for one dataset, the changed roots and every asset below them that was
  materialised before (for that dataset);
* :func:`retrain_requests` — one run per dataset concerned (a dataset's change concerns it alone; new
  CLIP weights concern every dataset);
* :func:`stale_assets` — what Dagster marks STALE, per dataset (the one use of private Dagster API, confined here);
* :func:`runs_in_progress` — queued or running runs that touch some assets of a dataset (the change then waits);
* :func:`retrain_run_request` — one run of the selection with the ``REID_RUN_CONFIG`` preset(s), merged
  exactly like repeated ``-c`` files on the CLI (:func:`load_run_preset`).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import dagster as dg
import yaml

from reid_pipeline.assets.raw import SOURCE_FINGERPRINTS, raw_dataset
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.resources import ReidSettings

__all__ = [
    "DATA_VERSION_TAG",
    "automation_default_status",
    "env_seconds",
    "merge_run_configs",
    "preset_paths",
    "load_run_config",
    "load_run_preset",
    "source_name",
    "changed_source_observations",
    "retrain_selection",
    "retrain_requests",
    "stale_assets",
    "stale_asset_keys",
    "runs_in_progress",
    "retrain_run_request",
]

DATA_VERSION_TAG = "dagster/data_version"  # the tag Dagster reads an observation's data version from
PARTITION_TAG = "dagster/partition"
#: sources observed once per dataset
PARTITIONED_SOURCES = frozenset({raw_dataset.key})
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


def env_seconds(name: str, default: int) -> int:
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


def merge_run_configs(*configs: dict) -> dict:
    """Deep-merge run configs left to right, as the Dagster CLI merges repeated ``-c`` files:
    mappings merge key by key, anything else (scalars, lists) is replaced by the later file."""
    merged: dict = {}
    for config in configs:
        merged = _merge(merged, config)
    return merged


def _merge(onto: dict, new: dict) -> dict:
    out = dict(onto)
    for key, value in new.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset_paths(spec: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """The preset files named by ``spec`` (else ``$REID_RUN_CONFIG``): one path, or several separated by
    commas (a base file first, then overlays)."""
    spec = spec if spec is not None else os.environ.get("REID_RUN_CONFIG") or None
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else [spec] if isinstance(spec, os.PathLike) else list(spec)
    return [Path(str(item).strip()).expanduser() for item in items if str(item).strip()]


def load_run_config(spec: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """The merged run config of the preset files named by ``spec`` (see :func:`preset_paths`).

    Raises:
        FileNotFoundError: a preset file does not exist.
        ValueError: it is not YAML holding a mapping.
    """
    configs = []
    for file in preset_paths(spec):
        if not file.is_file():
            raise FileNotFoundError(f"run-config preset {str(file)!r} (REID_RUN_CONFIG) does not exist")
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"run-config preset {str(file)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"run-config preset {str(file)!r}: expected a mapping, got {type(data).__name__}")
        configs.append(data)
    return merge_run_configs(*configs)


def load_run_preset(spec: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> dict:
    """The ``ops:`` section of the merged presets (none named → ``{}``)."""
    ops = load_run_config(spec).get("ops", {})
    if not isinstance(ops, dict):
        raise ValueError(f"run-config preset(s) {spec or os.environ.get('REID_RUN_CONFIG')!r}: expected a mapping under 'ops'")
    return ops


def _recorded(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None) -> tuple[str | None, int]:
    """The data version last recorded for source ``key`` (of one dataset) and the storage id of that record (0: none)."""
    record = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
    if record is None or record.asset_observation is None:
        return None, 0
    return record.asset_observation.tags.get(DATA_VERSION_TAG), record.storage_id


def source_name(key: dg.AssetKey, partition: str | None) -> str:
    """How a source (of one dataset) is named in a sensor cursor and in messages: ``raw_dataset[market1501]``."""
    return key.to_user_string() + (f"[{partition}]" if partition is not None else "")


def changed_source_observations(
    instance: dg.DagsterInstance, reid: ReidSettings, seen: dict[str, str] | None = None,
    problems: list[str] | None = None,
) -> tuple[list[dg.AssetObservation], dict[str, str]]:
    """Fingerprint every source — ``raw_dataset`` once per dataset; observations for those whose version
    changed, and all fingerprints (keyed by :func:`source_name`).

    A fingerprint equal to ``seen`` (a sensor cursor) or to the version recorded last in ``instance``
    yields no observation, so re-observing unchanged data records nothing. Each observation carries
    ``previous_record`` (the storage id of the record it supersedes), which makes run keys unique.
    A source that cannot be fingerprinted (a missing root) raises — or, given a ``problems`` list, is
    described there and left out, so one missing dataset does not stop the others.
    """
    seen = seen or {}
    current: dict[str, str] = {}
    events: list[dg.AssetObservation] = []
    for key, fingerprint in SOURCE_FINGERPRINTS.items():
        for partition in (dataset_partitions.get_partition_keys() if key in PARTITIONED_SOURCES else [None]):
            name = source_name(key, partition)
            try:
                version = fingerprint(reid, partition)
            except (OSError, ValueError) as exc:
                if problems is None:
                    raise
                problems.append(f"{name}: {exc}")
                continue
            current[name] = version
            if seen.get(name) == version:
                continue
            recorded, storage_id = _recorded(instance, key, partition)
            if recorded == version:
                continue
            events.append(
                dg.AssetObservation(
                    asset_key=key,
                    partition=partition,
                    tags={DATA_VERSION_TAG: version, _USER_PROVIDED_TAG: "true"},
                    metadata={"fingerprint": version, "previous_version": recorded or "none", "previous_record": storage_id},
                )
            )
    return events, current


def _partitioned(asset_graph, key: dg.AssetKey) -> bool:
    return asset_graph.get(key).partitions_def is not None


def _materialised(instance: dg.DagsterInstance, asset_graph, keys: Iterable[dg.AssetKey],
                  partition: str | None) -> set[dg.AssetKey]:
    """Which of ``keys`` were materialised before: unpartitioned ones at all, per-dataset ones for ``partition``."""
    keys = list(keys)
    plain = [k for k in keys if not _partitioned(asset_graph, k)]
    found = {record.asset_entry.asset_key for record in instance.get_asset_records(plain)
             if record.asset_entry.last_materialization_record}
    if partition is not None:
        found |= {k for k in keys if _partitioned(asset_graph, k) and partition in instance.get_materialized_partitions(k)}
    return found


def retrain_selection(asset_graph, instance: dg.DagsterInstance, roots: Iterable[dg.AssetKey],
                      partition: str | None = None) -> list[dg.AssetKey]:
    """What retraining from ``roots`` runs for one dataset (``partition``; None: the unpartitioned assets
    only): the observable roots (re-observed first) and every materialisable root or descendant that has
    been materialised before — for that dataset, where the asset is per dataset (sorted).

    Never-materialised assets are left out: the first, expensive build stays a deliberate action.
    """
    roots = [dg.AssetKey.from_coercible(r) for r in roots]
    below: set[dg.AssetKey] = set()
    frontier = set(roots)
    while frontier:
        children = {child for key in frontier for child in asset_graph.get(key).child_keys}
        frontier = children - below
        below |= children
    candidates = {k for k in set(roots) | below if partition is not None or not _partitioned(asset_graph, k)}
    materialisable = {k for k in candidates if asset_graph.get(k).is_materializable}
    observed = {k for k in roots if k in candidates and asset_graph.get(k).is_observable}
    return sorted(observed | _materialised(instance, asset_graph, materialisable, partition),
                  key=lambda k: k.to_user_string())


def retrain_requests(asset_graph, instance: dg.DagsterInstance, roots: dict[str | None, set[dg.AssetKey]], *,
                     trigger: str, run_key: str | None = None) -> list[dg.RunRequest]:
    """One run per dataset whose assets need retraining from ``roots`` (dataset → root keys; ``None`` →
    unpartitioned roots such as ``clip_weights``, which concern every dataset). Each run also holds the
    unpartitioned assets below its roots (``frozen_clip``, ``cross_domain_metrics``) when they were
    materialised before; when no dataset is concerned, one unpartitioned run of those alone."""
    shared = set(roots.get(None, set()))
    requests = []
    for partition in dataset_partitions.get_partition_keys():
        own = set(roots.get(partition, set())) | shared
        if not own:
            continue
        selection = retrain_selection(asset_graph, instance, own, partition)
        if any(_partitioned(asset_graph, k) and asset_graph.get(k).is_materializable for k in selection):
            key = f"{run_key}-{partition}" if run_key else None
            requests.append(retrain_run_request(asset_graph, selection, trigger=trigger, run_key=key, partition=partition))
    if shared and not requests:
        request = retrain_run_request(asset_graph, retrain_selection(asset_graph, instance, shared), trigger=trigger,
                                      run_key=run_key)
        requests += [request] if request else []
    return [r for r in requests if r is not None]


def stale_assets(instance: dg.DagsterInstance, asset_graph) -> dict[str | None, set[dg.AssetKey]]:
    """Materialisable assets Dagster marks STALE (an input's data version or their code version changed),
    by dataset: ``{partition: keys}``, ``None`` for the unpartitioned assets.

    Dagster has no public API for an asset's stale status outside the UI/GraphQL: this is the one place
    that reaches into ``dagster._core``; ``test_private_dagster_api`` fails loudly on an upgrade that moves it.
    """
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus

    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=datetime.now(timezone.utc), last_event_id=None),
        instance=instance,
        asset_graph=asset_graph,
    )
    resolver = CachingStaleStatusResolver(instance, asset_graph, view)
    stale: dict[str | None, set[dg.AssetKey]] = {}
    for key in asset_graph.materializable_asset_keys:
        partitions = sorted(instance.get_materialized_partitions(key)) if _partitioned(asset_graph, key) else [None]
        for partition in partitions:
            if resolver.get_status(key, partition) == StaleStatus.STALE:
                stale.setdefault(partition, set()).add(key)
    return stale


def stale_asset_keys(instance: dg.DagsterInstance, asset_graph) -> set[dg.AssetKey]:
    """The assets stale for some dataset (or unpartitioned and stale): :func:`stale_assets` without the datasets."""
    return set().union(*stale_assets(instance, asset_graph).values())


def runs_in_progress(instance: dg.DagsterInstance, keys: Iterable[dg.AssetKey], partition: str | None = None) -> list[str]:
    """Ids of queued or running runs that (may) touch any of ``keys`` — of dataset ``partition`` when given
    (a run of another dataset does not count; a run of no dataset or of every one does)."""
    keys = set(keys)
    busy = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_ACTIVE_STATUSES)):
        other = run.tags.get(PARTITION_TAG)
        if partition is not None and other is not None and other != partition:
            continue
        if run.asset_selection is None or run.asset_selection & keys:
            busy.append(run.run_id)
    return busy


def retrain_run_request(
    asset_graph, selection: Sequence[dg.AssetKey], *, trigger: str, run_key: str | None = None,
    partition: str | None = None,
) -> dg.RunRequest | None:
    """One run of ``selection`` (for dataset ``partition``) with the preset's op config for the selected
    assets (None: nothing to build)."""
    if not any(asset_graph.get(k).is_materializable for k in selection):
        return None
    preset = load_run_preset()
    names = {k.to_python_identifier() for k in selection}
    run_config = {"ops": {op: cfg for op, cfg in preset.items() if op in names}} if preset else {}
    tags = {"reid/trigger": trigger}
    if os.environ.get("REID_RUN_CONFIG"):
        tags["reid/run_config"] = os.environ["REID_RUN_CONFIG"]
    return dg.RunRequest(run_key=run_key, asset_selection=list(selection), run_config=run_config, tags=tags,
                         partition_key=partition)
