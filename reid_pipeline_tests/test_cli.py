"""The command-line paths users and CI take: `dagster definitions validate` and `dagster asset materialize`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env

DAGSTER = str(Path(sys.executable).with_name("dagster"))


def _ci_config(tmp_path: Path, **overrides) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "ci.yaml").read_text())
    config["resources"]["reid"]["config"]["storage_dir"] = str(tmp_path / "artifacts")
    for key, value in overrides.items():
        config["resources"]["reid"]["config"][key] = value
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


@pytest.mark.slow
def test_materialize_every_asset_on_ci_preset(dagster_home, tmp_path):
    if not (PROJECT_ROOT / "data" / "embedded" / "synthetic-ci").is_dir():
        pytest.fail("embedded CI data missing: run `make embedded` (make test does)")
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "*", "-c",
                 str(_ci_config(tmp_path))], dagster_home)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "RUN_SUCCESS" in out
    # Every asset wrote its descriptor into its own timestamped folder.
    descriptors = sorted(p.parent.parent.name for p in (tmp_path / "artifacts").glob("*/*/descriptor.json"))
    assert "dataset_manifest" in descriptors and "frozen_clip" in descriptors
    # The materialisations persist in DAGSTER_HOME, where the UI and later CLI runs see them.
    import dagster as dg

    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for key in ("dataset_manifest", "frozen_clip"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None, key


def test_materialize_failure_exits_non_zero(dagster_home, tmp_path):
    proc = _run(["asset", "materialize", "-m", "reid_pipeline.definitions", "--select", "dataset_manifest", "-c",
                 str(_ci_config(tmp_path, data_root=str(tmp_path / "does-not-exist")))], dagster_home)
    assert proc.returncode != 0
    assert "does-not-exist" in proc.stdout + proc.stderr
