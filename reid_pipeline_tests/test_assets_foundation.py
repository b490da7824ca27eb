"""The foundation assets in-process: manifest + frozen CLIP, versions, metadata and failures."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from reid_pipeline.assets.backbone import frozen_clip
from reid_pipeline.assets.data import dataset_manifest
from reid_pipeline.embedded.synthetic import generate_synthetic_dataset
from reid_pipeline.definitions import defs
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.resources import ArtifactIOManager, ReidSettings, TrainingDevice

DATASET = "synthetic-ci"  # one of the default partitions; the tests point it at their own folders


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "market"
    generate_synthetic_dataset(root, num_ids=8, images_per_id=4, seed=3)
    return root


def _resources(data_root: Path, clip: Path, storage: Path) -> dict:
    return {
        "reid": ReidSettings(datasets={DATASET: str(data_root)}, clip_weights=str(clip), storage_dir=str(storage)),
        "device": TrainingDevice(device="cpu"),
        "io_manager": ArtifactIOManager(),
    }


def _data_version(result: dg.ExecuteInJobResult, key: str) -> str:
    (mat,) = [m for m in result.asset_materializations_for_node(key)]
    return mat.tags["dagster/data_version"]


def test_definitions_load():
    repo = defs.get_repository_def()
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"dataset_manifest", "frozen_clip"} <= keys
    assert repo.get_job("reid_pipeline_job")


def test_manifest_and_clip_materialise_with_metadata(small_dataset, tiny_clip_path, tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    resources = _resources(small_dataset, tiny_clip_path, tmp_path / "artifacts")
    result = dg.materialize([dataset_manifest, frozen_clip], resources=resources, instance=instance, partition_key=DATASET)
    assert result.success
    (manifest_mat,) = result.asset_materializations_for_node("dataset_manifest")
    meta = manifest_mat.metadata
    df = pd.read_parquet(meta["manifest"].value)
    assert list(df.columns) == ["path", "pid", "camid", "split", "label"]
    assert meta["num_images"].value == len(df)
    assert meta["num_train_ids"].value == df[df.split == "train"].pid.nunique() == 4
    splits = {r.data["split"]: r.data for r in meta["per_split"].value.records}
    assert set(splits) == {"train", "query", "gallery"}
    assert splits["train"]["images"] == (df.split == "train").sum()
    assert meta["fingerprint"].value == manifest_mat.tags["dagster/data_version"]
    (clip_mat,) = result.asset_materializations_for_node("frozen_clip")
    assert clip_mat.metadata["input_size"].value == "256x128"
    assert clip_mat.metadata["parameter_count"].value > 1_000_000
    assert len(clip_mat.metadata["weights_sha256"].value) == 64
    # The descriptor the IO manager stored is what a downstream asset receives.
    descriptor = Path(manifest_mat.metadata["descriptor"].value)
    # Each dataset writes its own folders: storage/<asset>/<dataset>/<timestamp>_<run>/
    assert descriptor.is_file() and descriptor.parent.parent.name == DATASET
    assert descriptor.parent.parent.parent.name == "dataset_manifest"
    assert meta["dataset"].value == DATASET


def test_data_version_follows_content_not_mtime(small_dataset, tiny_clip_path, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(small_dataset, root)
    resources = _resources(root, tiny_clip_path, tmp_path / "artifacts")
    instance = dg.DagsterInstance.ephemeral()
    v1 = _data_version(dg.materialize([dataset_manifest], resources=resources, instance=instance,
                                      partition_key=DATASET), "dataset_manifest")
    some = sorted((root / "bounding_box_train").iterdir())[0]
    some.touch()
    v2 = _data_version(dg.materialize([dataset_manifest], resources=resources, instance=instance,
                                      partition_key=DATASET), "dataset_manifest")
    assert v1 == v2
    shutil.copy(sorted((root / "bounding_box_train").iterdir())[1], root / "bounding_box_train" / "0999_c1s1_000001_00.jpg")
    v3 = _data_version(dg.materialize([dataset_manifest], resources=resources, instance=instance,
                                      partition_key=DATASET), "dataset_manifest")
    assert v3 != v1


def test_failed_run_keeps_previous_materialisation(small_dataset, tiny_clip_path, tmp_path):
    storage = tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    ok = dg.materialize([dataset_manifest], resources=_resources(small_dataset, tiny_clip_path, storage), instance=instance,
                        partition_key=DATASET)
    assert ok.success
    good = instance.get_latest_materialization_event(dg.AssetKey("dataset_manifest")).asset_materialization
    bad_root = tmp_path / "broken"
    shutil.copytree(small_dataset, bad_root)
    victim = sorted((bad_root / "query").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(Exception, match=victim.name):
        dg.materialize([dataset_manifest], resources=_resources(bad_root, tiny_clip_path, storage), instance=instance,
                       partition_key=DATASET)
    latest = instance.get_latest_materialization_event(dg.AssetKey("dataset_manifest")).asset_materialization
    assert latest.metadata["fingerprint"] == good.metadata["fingerprint"]
    assert Path(latest.metadata["manifest"].value).is_file()


def test_missing_root_and_bad_weights_are_clear(tmp_path, tiny_clip_path, small_dataset):
    with pytest.raises(Exception, match="nowhere"):
        dg.materialize([dataset_manifest], resources=_resources(tmp_path / "nowhere", tiny_clip_path, tmp_path / "a"),
                       partition_key=DATASET)
    with pytest.raises(Exception, match="dataset 'synthetic' has no root in reid.datasets .configured: synthetic-ci"):
        dg.materialize([dataset_manifest], resources=_resources(tmp_path, tiny_clip_path, tmp_path / "a"),
                       partition_key="synthetic")
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception, match="weights.pt"):
        dg.materialize([frozen_clip], resources=_resources(small_dataset, bogus, tmp_path / "a"))


def test_env_vars_choose_datasets_and_weights(monkeypatch, tmp_path):
    """REID_DATASETS (else REID_DATA_ROOT) decides the dataset partitions where the definitions load; the
    roots reach ReidSettings.datasets; REID_CLIP_WEIGHTS shows as an EnvVar."""
    import json
    import subprocess
    import sys

    probe = ("import json; from reid_pipeline.definitions import defs, settings; "
             "g = defs.get_repository_def().asset_graph; "
             "print(json.dumps([sorted(g.get(k).partitions_def.get_partition_keys()) for k in "
             "[__import__('dagster').AssetKey('visual_encoder')]] + [settings.datasets]))")

    def load(**env) -> list:
        base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("REID_")}
        out = subprocess.run([sys.executable, "-c", probe], env={**base, **env}, capture_output=True, text=True,
                             timeout=120, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    assert load() == [["synthetic", "synthetic-ci"], {"synthetic": "data/embedded/synthetic",
                                                       "synthetic-ci": "data/embedded/synthetic-ci"}]
    assert load(REID_DATASETS=f"market1501={tmp_path}/m,dukemtmc={tmp_path}/d") == [
        ["dukemtmc", "market1501"], {"market1501": f"{tmp_path}/m", "dukemtmc": f"{tmp_path}/d"}]
    assert load(REID_DATA_ROOT=f"{tmp_path}/Market-1501-v15.09.15")[0] == ["market-1501-v15.09.15"]

    import importlib

    import reid_pipeline.definitions as definitions

    monkeypatch.setenv("REID_CLIP_WEIGHTS", "RN50")
    try:
        reloaded = importlib.reload(definitions)
        assert reloaded.settings.clip_weights.env_var_name == "REID_CLIP_WEIGHTS"
    finally:
        monkeypatch.delenv("REID_CLIP_WEIGHTS")
        importlib.reload(definitions)


def test_evaluation_checks_can_fail(tmp_path):
    """evaluation_metrics' checks see what they claim to: a query without a true match in the gallery fails
    `every_query_has_a_match`, and `minimum_map` blocks below its threshold."""
    import torch

    from reid_pipeline.artifacts import FeaturesArtifact
    from reid_pipeline.assets.evaluation import evaluation_metrics
    from reid_pipeline.storage import save_tensors
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    q_pids, g_pids = torch.tensor([1, 2, 9]), torch.tensor([1, 1, 2, 2, 3])  # pid 9 has no match
    tensors = {"query": torch.randn(3, 8, generator=g), "gallery": torch.randn(5, 8, generator=g),
               "query_pids": q_pids, "gallery_pids": g_pids,
               "query_camids": torch.zeros(3, dtype=torch.int64), "gallery_camids": torch.ones(5, dtype=torch.int64)}
    tensors["baseline_query"], tensors["baseline_gallery"] = tensors["query"].clone(), tensors["gallery"].clone()
    for name in ["q0.jpg", "q1.jpg", "q2.jpg", *[f"g{i}.jpg" for i in range(5)]]:
        Image.new("RGB", (16, 32), (90, 90, 90)).save(tmp_path / name)
    path = save_tensors(tmp_path / "features.safetensors", tensors, {
        "root": str(tmp_path), "query_paths": ["q0.jpg", "q1.jpg", "q2.jpg"], "gallery_paths": [f"g{i}.jpg" for i in range(5)]})
    artifact = FeaturesArtifact(artifact_dir=str(tmp_path), features=str(path), root=str(tmp_path),
                                encoder_weights="w.safetensors", precision="fp32")

    @dg.asset(name="reid_features", partitions_def=dataset_partitions)
    def stub():
        return artifact

    resources = {"reid": ReidSettings(storage_dir=str(tmp_path / "store")), "device": TrainingDevice(device="cpu"),
                 "io_manager": ArtifactIOManager()}
    with dg.instance_for_test() as instance:
        assert dg.materialize([stub], instance=instance, resources=resources, partition_key=DATASET).success
        result = dg.materialize([stub, evaluation_metrics], selection=[evaluation_metrics], instance=instance,
                                resources=resources, raise_on_error=False, partition_key=DATASET,
                                run_config={"ops": {"evaluation_metrics": {"config": {"k1": 2, "k2": 1, "min_map": 1.01}}}})
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert not checks["every_query_has_a_match"].passed
    assert checks["every_query_has_a_match"].metadata["queries_skipped"].value == 1
    assert not checks["minimum_map"].passed and checks["metrics_in_range"].passed


def test_paper_weight_names_resolve_as_names(tmp_path, monkeypatch):
    """The paper presets' `clip_weights: ViT-B/16` is a model name, not `<cwd>/ViT-B/16`; its cheap
    fingerprint works without the download; an unknown name and a missing file are clear errors."""
    from reid_pipeline.assets.raw import clip_weights_fingerprint
    from reid_pipeline.model.clip_loader import ClipWeightsError

    monkeypatch.chdir(tmp_path)
    for given in ("ViT-B/16", "vitb16", "RN50"):
        spec = ReidSettings(clip_weights=given).clip_weights_spec()
        assert spec in ("ViT-B/16", "RN50") and not spec.startswith("/")
        assert len(clip_weights_fingerprint(ReidSettings(clip_weights=given))) == 64
    with pytest.raises(ClipWeightsError, match="unknown model name"):
        ReidSettings(clip_weights="ViT-Z/99").clip_weights_spec()
    with pytest.raises(FileNotFoundError, match="missing.pt: no such file"):
        clip_weights_fingerprint(ReidSettings(clip_weights="./missing.pt"))
