"""Retrain sensor, nightly schedule and lineage — in-process, on tiny data, with two datasets side by side.

The downstream chain is mirrored by light stand-ins (same keys and dependencies as the pipeline's
training and evaluation assets), so the automation logic runs exactly, in seconds; the real graph
runs under ``dagster dev`` in ``test_ui_e2e.py``.
"""


import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml

from reid_pipeline.assets.data import dataset_manifest
from reid_pipeline.assets.raw import clip_weights, raw_dataset
from reid_pipeline.jobs import reid_job
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.pools import GPU_OP_TAGS, GPU_POOL
from reid_pipeline.retrain import automation_default_status, changed_source_observations, load_run_preset, stale_assets
from reid_pipeline.schedules import nightly_retrain_schedule
from reid_pipeline.sensors import retrain_sensor
from reid_pipeline.embedded.synthetic import generate_synthetic_dataset
from reid_pipeline.resources import ArtifactIOManager, ReidSettings, TrainingDevice
from reid_pipeline.storage import file_sha256
from reid_pipeline_tests.conftest import PROJECT_ROOT

A, B = "synthetic", "synthetic-ci"  # the default dataset partitions; the tests point them at their own folders
CROSS = "cross_domain_metrics"  # unpartitioned, reads every dataset's encoder: it follows every dataset's retraining
CHAIN = {"dataset_manifest", "prompt_checkpoint", "visual_encoder", "reid_features", "evaluation_metrics", CROSS}
BELOW_CLIP = {"frozen_clip", "prompt_checkpoint", "visual_encoder", "reid_features", "evaluation_metrics", CROSS}
# Dagster's staleness is one hop: an asset is STALE when an input's data version (or its own code
# version) differs from what it was built from; its consumers turn stale once it is rebuilt with a
# new version. Retraining therefore runs the whole chain below a change, in one run.


# --- stand-ins for the heavy assets (same keys and edges as the pipeline) -------------------------


class StubConfig(dg.Config):
    epochs: int = 120


def _stand_ins(prompt_code_version: str = "1") -> list[dg.AssetsDefinition]:
    @dg.asset(name="frozen_clip", deps=[clip_weights], group_name="backbone", code_version="1")
    def frozen_clip_stub(reid: ReidSettings) -> dg.Output[None]:
        # Like the real asset: the data version is the weights' content hash, not their mtime.
        return dg.Output(None, data_version=dg.DataVersion(file_sha256(reid.clip_weights_spec())))

    per_dataset = {"partitions_def": dataset_partitions}

    @dg.asset(name="prompt_checkpoint", deps=["dataset_manifest", "frozen_clip"], code_version=prompt_code_version,
              **per_dataset)
    def prompt_checkpoint(context: dg.AssetExecutionContext, config: StubConfig) -> None:
        context.add_output_metadata({"epochs": config.epochs})

    @dg.asset(name="visual_encoder", deps=["prompt_checkpoint", "dataset_manifest", "frozen_clip"], code_version="1",
              **per_dataset)
    def visual_encoder() -> None: ...

    @dg.asset(name="reid_features", deps=["visual_encoder", "dataset_manifest"], code_version="1", **per_dataset)
    def reid_features() -> None: ...

    @dg.asset(name="evaluation_metrics", deps=["reid_features"], code_version="1", **per_dataset)
    def evaluation_metrics() -> None: ...

    @dg.asset(name=CROSS, code_version="1", deps=[dg.AssetDep("visual_encoder", partition_mapping=dg.AllPartitionMapping())])
    def cross_domain_metrics() -> None: ...

    return [frozen_clip_stub, prompt_checkpoint, visual_encoder, reid_features, evaluation_metrics, cross_domain_metrics]


def _names(keys) -> set[str]:
    return {dg.AssetKey.from_coercible(k).to_user_string() for k in keys}


def _labels(by_partition: dict) -> set[str]:
    """``{partition: keys}`` as ``{"key[partition]", "key"}``."""
    return {k.to_user_string() + (f"[{p}]" if p else "") for p, keys in by_partition.items() for k in keys}


class Pipeline:
    """A test-sized pipeline: the real sources and manifest + stand-ins, with the project's sensor and schedule."""

    def __init__(self, roots: dict[str, Path], weights: Path, storage: Path, prompt_code_version: str = "1"):
        self.reid = ReidSettings(datasets={k: str(v) for k, v in roots.items()}, clip_weights=str(weights),
                                 storage_dir=str(storage))
        self.assets = [dataset_manifest, *_stand_ins(prompt_code_version)]
        self.resources = {"reid": self.reid, "device": TrainingDevice(device="cpu"), "io_manager": ArtifactIOManager(),
                          "pipes_subprocess_client": dg.PipesSubprocessClient()}
        # The project's own job (the sensor and the schedule are built from it), resolved against these assets.
        self.defs = dg.Definitions(
            assets=[raw_dataset, clip_weights, *self.assets],
            jobs=[reid_job],
            sensors=[retrain_sensor],
            schedules=[nightly_retrain_schedule],
            resources=self.resources,
        )
        self.repo = self.defs.get_repository_def()
        self.cursor: str | None = None

    def sense(self, instance: dg.DagsterInstance) -> dg.SensorResult | dg.SkipReason:
        """One tick of the retrain sensor; observations are stored and the cursor kept, as the daemon does."""
        context = dg.build_sensor_context(
            instance=instance, cursor=self.cursor, resources={"reid": self.reid}, repository_def=self.repo
        )
        result = retrain_sensor(context)
        if isinstance(result, dg.SensorResult):
            for event in result.asset_events:
                instance.report_runless_asset_event(event)
            self.cursor = result.cursor
        return result

    def nightly(self, instance: dg.DagsterInstance) -> dg.RunRequest | dg.SkipReason:
        # As a context manager: the instance it opens from the ref is closed again (no global state leaks).
        with dg.build_schedule_context(instance=instance, resources={"reid": self.reid}, repository_def=self.repo) as context:
            return nightly_retrain_schedule(context)

    def root(self, dataset: str = A) -> Path:
        return Path(self.reid.datasets[dataset])

    def run(self, instance: dg.DagsterInstance, request: dg.RunRequest | None = None) -> dg.ExecuteInProcessResult:
        """Execute a run request's materialisable selection, for its dataset (everything, for each dataset in
        turn, when ``request`` is None)."""
        if request is None:
            for dataset in (A, B):
                result = dg.materialize(self.assets, instance=instance, resources=self.resources, partition_key=dataset)
                assert result.success
            return result
        selection = [k for k in request.asset_selection if self.repo.asset_graph.get(k).is_materializable]
        result = dg.materialize(self.assets, instance=instance, resources=self.resources, selection=selection,
                                run_config=request.run_config, partition_key=request.partition_key)
        assert result.success
        return result

    def stale(self, instance: dg.DagsterInstance) -> set[str]:
        return _labels(stale_assets(instance, self.repo.asset_graph))


def _requests(result: dg.SensorResult | dg.SkipReason) -> list[dg.RunRequest]:
    return list(result.run_requests or []) if isinstance(result, dg.SensorResult) else []


def _events(result: dg.SensorResult | dg.SkipReason) -> list[dg.AssetObservation]:
    return list(result.asset_events) if isinstance(result, dg.SensorResult) else []


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "market"
    generate_synthetic_dataset(root, num_ids=6, images_per_id=4, num_cameras=3, seed=5)
    return root


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "duke"
    generate_synthetic_dataset(root, num_ids=5, images_per_id=4, num_cameras=2, seed=6)
    return root


@pytest.fixture()
def pipeline(tiny_dataset, other_dataset, tmp_path, monkeypatch) -> Pipeline:
    monkeypatch.delenv("REID_RUN_CONFIG", raising=False)
    roots = {A: tmp_path / "market", B: tmp_path / "duke"}
    shutil.copytree(tiny_dataset, roots[A])
    shutil.copytree(other_dataset, roots[B])
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"stand-in CLIP weights" * 100)
    return Pipeline(roots, weights, tmp_path / "artifacts")


def _add_image(root: Path) -> Path:
    """A copy of a training image under a new valid Market-1501 name (same identity, new frame)."""
    src = sorted((root / "bounding_box_train").glob("*.jpg"))[0]
    pid, cam = src.name.split("_")[:2]
    dst = root / "bounding_box_train" / f"{pid}_{cam}_999999_01.jpg"
    shutil.copy(src, dst)
    return dst


def _bootstrapped(pipeline: Pipeline, instance: dg.DagsterInstance | None = None) -> dg.DagsterInstance:
    """First sensor tick (observes, nothing to train yet), then everything materialised: all fresh."""
    instance = instance or dg.DagsterInstance.ephemeral()
    first = pipeline.sense(instance)
    assert {(e.asset_key.to_user_string(), e.partition) for e in _events(first)} == {
        ("raw_dataset", A), ("raw_dataset", B), ("clip_weights", None)}  # every dataset's folder on its own
    assert _requests(first) == []  # nothing was ever materialised: automation never builds from scratch
    pipeline.run(instance)
    assert pipeline.stale(instance) == set()
    return instance


# --- the retrain sensor ------------------------------------------------------------------------------


def test_a_dataset_change_retrains_that_dataset_only(pipeline):
    instance = _bootstrapped(pipeline)
    quiet = pipeline.sense(instance)  # nothing changed: nothing recorded, nothing requested
    assert _events(quiet) == [] and _requests(quiet) == [] and quiet.skip_reason is not None

    _add_image(pipeline.root(B))
    tick = pipeline.sense(instance)
    (event,) = _events(tick)
    assert event.asset_key == raw_dataset.key and event.partition == B
    assert json.loads(pipeline.cursor)[f"raw_dataset[{B}]"] == event.tags["dagster/data_version"]
    (request,) = _requests(tick)
    assert request.partition_key == B  # the other dataset is not retrained
    assert _names(request.asset_selection) == {"raw_dataset"} | CHAIN  # re-observes, then the chain; not frozen_clip
    assert request.run_key and request.tags["reid/trigger"] == "source changed"
    assert pipeline.stale(instance) == {f"dataset_manifest[{B}]"}  # what the UI shows until the run is done

    again = pipeline.sense(instance)
    assert _events(again) == [] and _requests(again) == []

    pipeline.run(instance, request)
    assert pipeline.stale(instance) == set()
    assert _requests(pipeline.sense(instance)) == []


def test_two_datasets_changing_at_once_give_one_run_each(pipeline):
    instance = _bootstrapped(pipeline)
    _add_image(pipeline.root(A))
    _add_image(pipeline.root(B))
    requests = _requests(pipeline.sense(instance))
    assert sorted(r.partition_key for r in requests) == [A, B]
    assert len({r.run_key for r in requests}) == 2
    for request in requests:
        pipeline.run(instance, request)
    assert pipeline.stale(instance) == set()


def test_automatic_runs_use_the_run_config_preset(pipeline, tmp_path, monkeypatch):
    instance = _bootstrapped(pipeline)
    preset = tmp_path / "preset.yaml"
    ci_ops = yaml.safe_load((PROJECT_ROOT / "configs" / "ci.yaml").read_text())["ops"]
    ops = {"dataset_manifest": ci_ops["dataset_manifest"], "frozen_clip": ci_ops["frozen_clip"]}
    ops["prompt_checkpoint"] = {"config": {"epochs": 2}}  # the stand-in's config
    preset.write_text(yaml.safe_dump({"ops": ops}))
    monkeypatch.setenv("REID_RUN_CONFIG", str(preset))
    _add_image(pipeline.root())
    (request,) = _requests(pipeline.sense(instance))
    # Only the selected assets' op config (frozen_clip is not retrained), so the run config validates.
    assert set(request.run_config["ops"]) == {"dataset_manifest", "prompt_checkpoint"}
    assert request.tags["reid/run_config"] == str(preset)
    result = pipeline.run(instance, request)
    (mat,) = result.asset_materializations_for_node("prompt_checkpoint")
    assert mat.metadata["epochs"].value == 2


def test_change_waits_while_a_run_of_that_dataset_is_in_progress(pipeline):
    instance = _bootstrapped(pipeline)

    def busy(run_id: str, dataset: str) -> None:
        instance.add_run(dg.DagsterRun(job_name=reid_job.name, run_id=run_id, status=dg.DagsterRunStatus.STARTED,
                                       asset_selection=frozenset({dg.AssetKey("visual_encoder")}),
                                       tags={"dagster/partition": dataset}))

    busy("busy-b", B)
    cursor = json.loads(pipeline.cursor)
    _add_image(pipeline.root(A))
    _add_image(pipeline.root(B))
    tick = pipeline.sense(instance)
    (request,) = _requests(tick)  # A goes ahead: a run of B does not hold it back
    assert request.partition_key == A
    assert json.loads(pipeline.cursor)[f"raw_dataset[{B}]"] == cursor[f"raw_dataset[{B}]"]  # B's change is not consumed
    assert [e.partition for e in _events(tick)] == [A]
    waiting = pipeline.sense(instance)
    assert isinstance(waiting, dg.SkipReason) and "busy-b" in waiting.skip_message
    instance.delete_run("busy-b")
    (request,) = _requests(pipeline.sense(instance))
    assert request.partition_key == B


def test_new_weights_wait_for_a_run_of_any_dataset(pipeline):
    instance = _bootstrapped(pipeline)
    instance.add_run(dg.DagsterRun(job_name=reid_job.name, run_id="busy-b", status=dg.DagsterRunStatus.STARTED,
                                   asset_selection=frozenset({dg.AssetKey("visual_encoder")}),
                                   tags={"dagster/partition": B}))
    Path(pipeline.reid.clip_weights).write_bytes(b"fine-tuned elsewhere" * 100)
    waiting = pipeline.sense(instance)
    assert isinstance(waiting, dg.SkipReason) and "busy-b" in waiting.skip_message  # B would be retrained too
    instance.delete_run("busy-b")
    assert sorted(r.partition_key for r in _requests(pipeline.sense(instance))) == [A, B]


def test_sensor_without_cursor_trusts_the_instance(pipeline):
    """A restarted sensor (no or unreadable cursor) does not re-record versions the instance holds."""
    instance = _bootstrapped(pipeline)
    for cursor in (None, "not json"):
        pipeline.cursor = cursor
        tick = pipeline.sense(instance)
        assert _events(tick) == [] and _requests(tick) == []


def test_never_materialised_assets_are_not_built_automatically(pipeline):
    instance = dg.DagsterInstance.ephemeral()
    assert _requests(pipeline.sense(instance)) == []
    _add_image(pipeline.root())
    tick = pipeline.sense(instance)
    assert len(_events(tick)) == 1 and _requests(tick) == []


def test_weights_change_retrains_every_dataset_below_the_backbone(pipeline):
    instance = _bootstrapped(pipeline)
    Path(pipeline.reid.clip_weights).write_bytes(b"fine-tuned elsewhere" * 100)
    tick = pipeline.sense(instance)
    assert [e.asset_key for e in _events(tick)] == [clip_weights.key]
    requests = _requests(tick)
    assert sorted(r.partition_key for r in requests) == [A, B]  # new weights concern every dataset
    for request in requests:
        assert _names(request.asset_selection) == {"clip_weights"} | BELOW_CLIP
    assert pipeline.stale(instance) == {"frozen_clip"}
    for request in requests:
        pipeline.run(instance, request)
    assert pipeline.stale(instance) == set()


def test_sensor_names_a_missing_data_root_and_goes_on_with_the_others(pipeline, tmp_path):
    reid = ReidSettings(datasets={A: str(tmp_path / "gone")}, clip_weights=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gone"):
        changed_source_observations(dg.DagsterInstance.ephemeral(), reid)
    instance = _bootstrapped(pipeline)
    shutil.rmtree(pipeline.root(A))
    _add_image(pipeline.root(B))
    tick = pipeline.sense(instance)
    (request,) = _requests(tick)
    assert request.partition_key == B
    problems: list[str] = []
    changed_source_observations(instance, pipeline.reid, problems=problems)
    assert len(problems) == 1 and f"raw_dataset[{A}]" in problems[0] and str(pipeline.root(A)) in problems[0]


# --- lineage and staleness ------------------------------------------------------------------------------


def test_reobserving_unchanged_data_makes_nothing_stale(pipeline):
    instance = _bootstrapped(pipeline)
    # Explicit re-observations (e.g. "Observe sources" in the UI) that record the same versions again.
    events, _ = changed_source_observations(dg.DagsterInstance.ephemeral(), pipeline.reid)
    assert len(events) == 3  # two dataset folders and the weights
    for event in events:
        instance.report_runless_asset_event(event)
    assert len(instance.fetch_observations(raw_dataset.key, limit=10).records) >= 2
    assert pipeline.stale(instance) == set()
    assert _requests(pipeline.sense(instance)) == []


def test_touched_data_leaves_the_manifest_content_version_unchanged(pipeline):
    """The cheap fingerprint sees a touch; the manifest's content version does not move, so nothing below is stale."""
    instance = _bootstrapped(pipeline)
    key = dg.AssetKey("dataset_manifest")
    before = instance.get_latest_data_version_record(key, partition_key=A).asset_materialization.tags["dagster/data_version"]
    image = sorted((pipeline.root(A) / "query").glob("*.jpg"))[0]
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert len(_events(pipeline.sense(instance))) == 1
    assert pipeline.stale(instance) == {f"dataset_manifest[{A}]"}
    pipeline.run(instance, dg.RunRequest(asset_selection=[key], partition_key=A))
    after = instance.get_latest_data_version_record(key, partition_key=A).asset_materialization.tags["dagster/data_version"]
    assert after == before
    assert pipeline.stale(instance) == set()


def test_code_version_change_makes_exactly_that_asset_stale(pipeline, tmp_path):
    instance = _bootstrapped(pipeline)
    bumped = Pipeline(
        {A: pipeline.root(A), B: pipeline.root(B)}, Path(pipeline.reid.clip_weights), tmp_path / "artifacts",
        prompt_code_version="2",
    )
    assert bumped.stale(instance) == {f"prompt_checkpoint[{A}]", f"prompt_checkpoint[{B}]"}
    bumped.run(instance, dg.RunRequest(asset_selection=[dg.AssetKey("prompt_checkpoint")], partition_key=A))
    # one hop: now its consumer sees a new version — for that dataset; the other is still stale
    assert bumped.stale(instance) == {f"visual_encoder[{A}]", f"prompt_checkpoint[{B}]"}


# --- the nightly schedule -----------------------------------------------------------------------------


def test_nightly_schedule_retrains_only_when_something_is_stale(pipeline, tmp_path):
    with dg.instance_for_test() as instance:  # a schedule context reaches the instance through its ref
        _bootstrapped(pipeline, instance)
        assert isinstance(pipeline.nightly(instance), dg.SkipReason)

        # A bumped code version: the asset and everything below it, one run per dataset.
        bumped = Pipeline(
            {A: pipeline.root(A), B: pipeline.root(B)}, Path(pipeline.reid.clip_weights), tmp_path / "artifacts",
            prompt_code_version="2",
        )
        requests = bumped.nightly(instance)
        assert sorted(r.partition_key for r in requests) == [A, B]
        for request in requests:
            assert _names(request.asset_selection) == {"prompt_checkpoint", "visual_encoder", "reid_features",
                                                       "evaluation_metrics", CROSS}
            bumped.run(instance, request)
        assert isinstance(bumped.nightly(instance), dg.SkipReason)

        # New data in one dataset while no sensor runs: the schedule observes it itself.
        _add_image(pipeline.root(A))
        (request,) = bumped.nightly(instance)
        assert request.partition_key == A and _names(request.asset_selection) == {"raw_dataset"} | CHAIN
        assert bumped.stale(instance) == {f"dataset_manifest[{A}]"}  # the observation was recorded
        bumped.run(instance, request)
        assert isinstance(bumped.nightly(instance), dg.SkipReason)


# --- presets, wiring, metadata and the GPU pool -------------------------------------------------------


def test_load_run_preset(tmp_path, monkeypatch):
    monkeypatch.delenv("REID_RUN_CONFIG", raising=False)
    assert load_run_preset() == {}
    assert set(load_run_preset(PROJECT_ROOT / "configs" / "ci.yaml")) >= {"dataset_manifest", "frozen_clip"}
    monkeypatch.setenv("REID_RUN_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_run_preset()
    bad = tmp_path / "bad.yaml"
    bad.write_text("ops: [1, 2]\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_run_preset(bad)


def test_project_definitions_wire_sources_automation_and_metadata():
    from reid_pipeline.definitions import defs

    repo = defs.get_repository_def()
    graph = repo.asset_graph
    assert {raw_dataset.key, clip_weights.key} <= graph.observable_asset_keys
    assert raw_dataset.key in graph.get(dg.AssetKey("dataset_manifest")).parent_keys
    assert clip_weights.key in graph.get(dg.AssetKey("frozen_clip")).parent_keys
    for key in graph.materializable_asset_keys:
        node = graph.get(key)
        name = key.to_user_string()
        assert node.code_version, f"{name} has no code_version"
        assert node.group_name in {"data", "backbone", "training", "evaluation", "serving"}, name
        assert node.owners and node.kinds, name
        shared = {"frozen_clip", "cross_domain_metrics"}  # one backbone; the matrix over every dataset
        assert (node.partitions_def is None) == (name in shared), f"{name}: per dataset unless shared"
    for key in graph.observable_asset_keys:
        assert graph.get(key).owners and graph.get(key).group_name in {"data", "backbone"}
    sensor = repo.get_sensor_def("reid_retrain_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    schedule = repo.get_schedule_def("nightly_retrain_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert sensor.job_name == schedule.job_name == reid_job.name
    job_keys = set(repo.get_job(reid_job.name).asset_layer.executable_asset_keys)
    assert {raw_dataset.key, clip_weights.key} | graph.materializable_asset_keys <= job_keys


def test_training_assets_use_the_gpu_pool_and_tags():
    from reid_pipeline.definitions import defs

    graph = defs.get_repository_def().asset_graph
    assert GPU_OP_TAGS["dagster-k8s/config"]["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    json.dumps(GPU_OP_TAGS)  # serialisable, as Dagster stores op tags
    training = {key.to_user_string() for key in graph.materializable_asset_keys if graph.get(key).group_name == "training"}
    assert training == {"prompt_checkpoint", "visual_encoder"}  # not vacuous if the group is renamed
    pooled = {key.to_user_string() for key in graph.materializable_asset_keys
              if graph.assets_def_for_key(key).op.pool == GPU_POOL}
    assert pooled == training  # and nothing else waits for the GPU
    for name in training:
        op = graph.assets_def_for_key(dg.AssetKey(name)).op
        assert op.pool == GPU_POOL, name
        assert json.loads(op.tags["dagster-k8s/config"]) == GPU_OP_TAGS["dagster-k8s/config"], name


def test_automation_default_status_follows_env(monkeypatch):
    monkeypatch.delenv("REID_AUTOMATION", raising=False)
    assert automation_default_status() == dg.DefaultSensorStatus.RUNNING
    monkeypatch.setenv("REID_AUTOMATION", "off")
    assert automation_default_status() == dg.DefaultSensorStatus.STOPPED
    monkeypatch.setenv("REID_AUTOMATION", "sometimes")
    with pytest.raises(ValueError, match="REID_AUTOMATION"):
        automation_default_status()
