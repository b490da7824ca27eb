"""The command-line paths users and CI take: `dagster definitions validate` and `dagster asset materialize`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reid_pipeline.artifacts import load_descriptor
from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env

DAGSTER = str(Path(sys.executable).with_name("dagster"))


DATASET = "synthetic-ci"  # the CI preset's dataset partition


def _ci_config(tmp_path: Path, min_map: float | None = None, process_per_step: bool = False, **overrides) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "ci.yaml").read_text())
    if process_per_step:  # Dagster's default executor, as the paper presets run
        del config["execution"]
    config["resources"]["reid"]["config"]["storage_dir"] = str(tmp_path / "artifacts")
    for key, value in overrides.items():
        config["resources"]["reid"]["config"][key] = value
    if min_map is not None:
        config["ops"]["evaluation_metrics"]["config"]["min_map"] = min_map
    path = tmp_path / "ci.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args: list[str], dagster_home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DAGSTER, *args], cwd=PROJECT_ROOT, env=cli_env(dagster_home), capture_output=True, text=True, timeout=timeout
    )


def test_definitions_validate(dagster_home):
    proc = _run(["definitions", "validate", "-m", "reid_pipeline.definitions"], dagster_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Validation successful" in proc.stderr + proc.stdout


PER_DATASET = ("dataset_manifest", "prompt_checkpoint", "visual_encoder", "reid_features", "evaluation_metrics",
               "gallery_index", "onnx_encoder")
SHARED = ("frozen_clip", "cross_domain_metrics")
ALL_ASSETS = PER_DATASET + SHARED


@pytest.mark.slow
def test_materialize_every_asset_on_ci_preset(dagster_home, tmp_path):
    """`dagster asset materialize --select '*' --partition synthetic-ci -c configs/ci.yaml` — the command CI users run,
    here with a process per step (Dagster's default executor, as the paper presets run; the preset asks for one
    process, which the other CLI tests use): every asset's output crosses a process boundary."""
    import dagster as dg

    if not (PROJECT_ROOT / "data" / "embedded" / "synthetic-ci").is_dir():
        pytest.fail("embedded CI data missing: run `make embedded` (make test does)")
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "*", "--partition", DATASET, "-c",
                 str(_ci_config(tmp_path, process_per_step=True))], dagster_home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RUN_SUCCESS" in out and "using multiprocess executor" in out
    # Every asset wrote its descriptor into its own timestamped folder — in its dataset's folder when per dataset.
    store = tmp_path / "artifacts"
    per_dataset = {p.parent.parent.parent.name for p in store.glob(f"*/{DATASET}/*/descriptor.json")}
    shared = {p.parent.parent.name for p in store.glob("*/*/descriptor.json")}
    assert per_dataset == set(PER_DATASET) and shared == set(SHARED)
    for path in [*store.glob(f"*/{DATASET}/*/descriptor.json"), *store.glob("*/*/descriptor.json")]:
        assert load_descriptor(path).kind == path.relative_to(store).parts[0]  # typed, and of the asset that wrote it
    # each asset writes only into its own folder, and no resumable training state is left behind
    assert not list(store.glob("reid_features/*/*/metrics.json"))
    assert not [p for p in (tmp_path / "artifacts").rglob("_resume/*") if p.exists()]
    # The materialisations persist in DAGSTER_HOME, where the UI and later CLI runs see them.
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for key in ALL_ASSETS:
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
        for key in PER_DATASET:
            assert instance.get_materialized_partitions(dg.AssetKey(key)) == {DATASET}, key
        cross = instance.get_latest_materialization_event(dg.AssetKey("cross_domain_metrics")).asset_materialization
        cross_artifact = load_descriptor(cross.metadata["descriptor"].value)
        assert cross_artifact.train_datasets == cross_artifact.test_datasets == [DATASET]  # the one dataset trained
        meta = instance.get_latest_materialization_event(dg.AssetKey("evaluation_metrics")).asset_materialization.metadata
        for prefix in ("", "reranked_", "baseline_"):
            for name in ("mAP", "mINP", "rank-1", "rank-5", "rank-10"):
                value = meta[f"{prefix}{name}"].value
                assert 0.0 <= value <= 1.0, (prefix, name, value)
        assert "data:image/png;base64," in meta["cmc_curve"].value
        assert "data:image/png;base64," in meta["rank_list"].value
        metrics_json = Path(meta["metrics_json"].value)
        assert json.loads(metrics_json.read_text())["mAP"] == pytest.approx(meta["mAP"].value)
        assert (metrics_json.parent / "rank_list.png").read_bytes()[:4] == b"\x89PNG"
        stage1 = instance.get_latest_materialization_event(dg.AssetKey("prompt_checkpoint")).asset_materialization.metadata
        assert stage1["avg_positives_per_sample"].value > 1.0
        assert Path(stage1["tokens"].value).is_file()
        assert 0.0 <= stage1["image_to_prompt_accuracy"].value <= 1.0
        # and the run's log says it, as `make demo` prints it
        assert f"image→prompt accuracy {stage1['image_to_prompt_accuracy'].value:.4f} over the" in out
        stage2 = instance.get_latest_materialization_event(dg.AssetKey("visual_encoder")).asset_materialization.metadata
        same_keys = {"final_loss", "first_loss", "epochs", "resumed_from_epoch", "wall_time_s", "samples_per_s",
                     "precision", "device"}
        assert same_keys <= set(stage1) and same_keys <= set(stage2)
        # the precision is recorded in every checkpoint's JSON and in the metrics metadata
        assert stage1["precision"].value == stage2["precision"].value == "fp32"  # the CI preset trains on the CPU
        assert json.loads(Path(stage2["weights"].value).with_suffix(".json").read_text())["precision"] == "fp32"
        assert json.loads(Path(stage1["tokens"].value).with_suffix(".json").read_text())["precision"] == "fp32"
        assert meta["feature_precision"].value == "fp32"
        # in-domain, the cross-domain matrix is the evaluation itself (same encoder, same protocol without re-ranking)
        assert cross_artifact.mAP[0][0] == pytest.approx(meta["mAP"].value, abs=1e-5)
        # the event log stays light: thumbnails inline, the full pictures as paths
        assert len(meta["rank_list"].value) < 200_000 and Path(meta["rank_list_path"].value).is_file()
        for key in ("prompt_checkpoint", "visual_encoder"):
            check_key = dg.AssetCheckKey(dg.AssetKey(key), "loss_decreased")
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key([check_key])[check_key]
            assert record.status.value == "SUCCEEDED", key

        # serving: the gallery index searches like the evaluation ranks (same features), the ONNX export is checked
        index_meta = instance.get_latest_materialization_event(dg.AssetKey("gallery_index")).asset_materialization.metadata
        onnx_meta = instance.get_latest_materialization_event(dg.AssetKey("onnx_encoder")).asset_materialization.metadata
        assert onnx_meta["max_abs_diff"].value <= 1e-4 and onnx_meta["topk_identical"].value is True
        assert Path(onnx_meta["onnx"].value).is_file()
        features = instance.get_latest_materialization_event(dg.AssetKey("reid_features")).asset_materialization.metadata
    _search_matches_the_evaluation(index_meta["index"].value, features["features"].value)

    # A blocking minimum-mAP check fails the run (non-zero exit); the earlier results stay on disk.
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "evaluation_metrics",
                 "--partition", DATASET, "-c", str(_ci_config(tmp_path, min_map=1.01))], dagster_home)
    assert proc.returncode != 0
    assert "minimum_map" in proc.stdout + proc.stderr
    assert metrics_json.is_file() and (metrics_json.parent / "cmc.png").is_file()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("evaluation_metrics"), "minimum_map")]
        )[dg.AssetCheckKey(dg.AssetKey("evaluation_metrics"), "minimum_map")]
        assert check.status.value == "FAILED"


def _search_matches_the_evaluation(index_dir: str, features_file: str) -> None:
    """`reid-search query` on a query image returns the gallery ranking the evaluation saw for it."""
    from reid_pipeline.evaluation import pairwise_distance
    from reid_pipeline.storage import load_tensors

    tensors, meta = load_tensors(features_file)
    assert json.loads((Path(index_dir) / "index.json").read_text())["count"] == len(meta["gallery_paths"])
    query = Path(meta["root"]) / meta["query_paths"][0]
    proc = subprocess.run([str(Path(sys.executable).with_name("reid-search")), "query", "--index", index_dir, str(query),
                           "--top-k", "5", "--json", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (hit,) = json.loads(proc.stdout)["queries"]
    dist = pairwise_distance(tensors["query"][:1], tensors["gallery"])[0]
    expected = [meta["gallery_paths"][i] for i in dist.numpy().argsort(kind="stable")[:5]]
    assert [Path(r["path"]).as_posix().endswith(e) for r, e in zip(hit["results"], expected)] == [True] * 5


def test_materialize_failure_exits_non_zero(dagster_home, tmp_path):
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "dataset_manifest",
                 "--partition", DATASET, "-c", str(_ci_config(tmp_path, datasets={DATASET: str(tmp_path / "does-not-exist")}))],
                dagster_home)
    assert proc.returncode != 0
    assert "does-not-exist" in proc.stdout + proc.stderr
    # a per-dataset asset launched without a dataset says how to name one
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "dataset_manifest", "-c",
                 str(_ci_config(tmp_path))], dagster_home)
    assert proc.returncode != 0
