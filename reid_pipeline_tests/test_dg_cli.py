"""`dg`, the CLI the Makefile, README and CI use: `dg check defs`, `dg list defs`, `dg launch --assets`.

`dg` finds the project through pyproject's ``[tool.dg]`` table (``root_module = "reid_pipeline"``,
target ``reid_pipeline.definitions``) from the project root; it runs in the project's own venv.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env
from reid_pipeline_tests.test_cli import DATASET, _ci_config

DG = str(Path(sys.executable).with_name("dg"))
MATERIALISABLE = {"dataset_manifest", "frozen_clip", "prompt_checkpoint", "visual_encoder", "reid_features", "evaluation_metrics",
                  "cross_domain_metrics"}
SOURCES = {"raw_dataset", "clip_weights"}


def _dg(args: list[str], dagster_home: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([DG, *args], cwd=PROJECT_ROOT, env=cli_env(dagster_home), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_dg_check_defs(dagster_home):
    proc = _dg(["check", "defs"], dagster_home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "All definitions loaded successfully" in proc.stdout + proc.stderr


def test_dg_list_defs_lists_the_pipeline(dagster_home):
    proc = _dg(["list", "defs", "--json"], dagster_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = json.loads(proc.stdout)
    assets = {a["asset_key"]: a for a in listed["assets"]}
    assert set(assets) >= MATERIALISABLE | SOURCES, sorted(assets)
    assert "raw_dataset" in assets["dataset_manifest"]["dependency_keys"]
    assert "prompt_checkpoint" in assets["visual_encoder"]["dependency_keys"]
    assert "reid_pipeline_job" in {j["name"] for j in listed["jobs"]}
    assert "reid_retrain_sensor" in {s["name"] for s in listed["sensors"]}
    assert {"evaluation_metrics:minimum_map"} <= {c["key"] for c in listed["asset_checks"]}


def test_dg_launch_materialises_on_the_ci_preset(dagster_home, tmp_path):
    """The head of the graph (the sources observed, the manifest and the frozen CLIP built) in one run;
    the whole graph through the CLI is test_cli's `dagster asset materialize` test."""
    if not (PROJECT_ROOT / "data" / "embedded" / "synthetic-ci").is_dir():
        pytest.fail("embedded CI data missing: run `make embedded` (make test does)")
    selection = "raw_dataset,dataset_manifest,clip_weights,frozen_clip"
    proc = _dg(["launch", "--assets", selection, "--partition", DATASET, "-c", str(_ci_config(tmp_path))], dagster_home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RUN_SUCCESS" in out
    store = tmp_path / "artifacts"
    found = {p.relative_to(store).parts[0]: p.relative_to(store).parts for p in store.rglob("descriptor.json")}
    assert set(found) == {"dataset_manifest", "frozen_clip"}
    assert found["dataset_manifest"][1] == DATASET and len(found["dataset_manifest"]) == 4  # <asset>/<dataset>/<stamp>/
    assert len(found["frozen_clip"]) == 3  # shared by every dataset: <asset>/<stamp>/
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for key in ("dataset_manifest", "frozen_clip"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key
        for key in SOURCES:  # observed in the same run: the retrain sensor finds nothing new afterwards
            partition = DATASET if key == "raw_dataset" else None  # each dataset's folder is observed on its own
            record = instance.get_latest_data_version_record(dg.AssetKey(key), is_source=True, partition_key=partition)
            assert record is not None and record.asset_observation is not None, key
        (run,) = instance.get_runs()
        assert run.is_success


def test_dg_launch_failure_exits_non_zero(dagster_home, tmp_path):
    missing = tmp_path / "does-not-exist"
    proc = _dg(["launch", "--assets", "dataset_manifest", "--partition", DATASET, "-c",
                str(_ci_config(tmp_path, datasets={DATASET: str(missing)}))], dagster_home)
    assert proc.returncode != 0
    assert "does-not-exist" in proc.stdout + proc.stderr
