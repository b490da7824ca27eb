"""End to end through the UI's API: ``dagster dev`` materialises, notices new data, retrains once by itself.

Everything goes through the webserver's GraphQL endpoint of a real ``dagster dev`` (webserver, daemon,
code server, run workers) with a temporary DAGSTER_HOME and temporary copies of the CI data and weights.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from reid_pipeline_tests.ui_server import (
    DATASET,
    JOB,
    RETRAIN_SENSOR,
    DagsterDev,
    dagster_ui,  # noqa: F401  (the shared server fixture)
    downstream_of,
    materialized_pipeline,
    wait_until,
)

pytestmark = pytest.mark.slow


def _add_image_atomically(server: DagsterDev) -> str:
    """A copy of a training image under a new valid name (same identity, new frame), appearing in one step."""
    train = server.data_root / "bounding_box_train"
    src = sorted(train.glob("*.jpg"))[0]
    pid, cam = src.name.split("_")[:2]
    name = f"{pid}_{cam}_999999_01.jpg"
    staging = server.root / name  # same filesystem, outside the dataset: the sensor never sees half a file
    shutil.copy(src, staging)
    os.replace(staging, train / name)
    return name


def test_materialise_change_data_and_retrain_automatically(dagster_ui: DagsterDev):  # noqa: F811
    server = dagster_ui
    # The automation runs under the daemon that `dagster dev` started, RUNNING by default.
    assert server.instigator_status(RETRAIN_SENSOR) == "RUNNING"

    # 1. Materialise the graph: one run of reid_pipeline_job launched through GraphQL.
    initial = materialized_pipeline(server)
    assert initial["jobName"] == JOB
    nodes = server.asset_nodes()
    materialisable = {name for name, node in nodes.items() if node["materializable"]}
    assert {"dataset_manifest", "frozen_clip"} <= materialisable
    assert {"raw_dataset", "clip_weights"} <= {name for name, node in nodes.items() if node["observable"]}
    for name in materialisable:
        assert nodes[name]["latest_run"] == initial["runId"], f"{name} was not materialised by {initial['runId']}"
        assert nodes[name]["stale"] == "FRESH", (name, nodes[name]["causes"])
    chain = downstream_of(nodes, "raw_dataset")
    assert "dataset_manifest" in chain and "frozen_clip" not in chain

    # Nothing changed: a whole sensor tick after the run launches nothing.
    server.wait_for_quiet_tick(after=initial["endTime"])
    assert len(server.runs()) == 1

    # 2. Change the dataset: a new image under a valid name.
    _add_image_atomically(server)

    # 3. The sensor records the new fingerprint: the manifest (the data's consumer) turns stale.
    def manifest_stale() -> dict | None:
        node = server.asset_nodes()["dataset_manifest"]
        return node if node["stale"] == "STALE" else None

    stale = wait_until(manifest_stale, 120, "dataset_manifest to become stale", interval=0.25)
    # The cause the UI shows: raw_dataset has a new data version.
    assert any(
        ["raw_dataset"] in (cause["key"]["path"], (cause["dependency"] or {}).get("path")) for cause in stale["causes"]
    ), stale
    assert server.asset_nodes()["frozen_clip"]["stale"] == "FRESH"

    # 4. Exactly one automatic run retrains the stale chain (re-observing the data first), and succeeds.
    def automatic_runs() -> list[dict]:
        return [r for r in server.runs() if r["tags"].get("dagster/sensor_name") == RETRAIN_SENSOR]

    (auto,) = wait_until(automatic_runs, 300, "the automatic retraining run", interval=1)
    assert auto["jobName"] == JOB and auto["tags"].get("reid/trigger") == "source changed"
    assert auto["tags"].get("dagster/partition") == DATASET  # the dataset whose folder changed
    assert auto["assets"] == chain | {"raw_dataset"}, f"automatic run selected {auto['assets']}, expected {chain}"
    auto = server.wait_for_run(auto["runId"])

    # 5. Fresh again, everything below the data rebuilt by that run; frozen_clip untouched.
    nodes = server.asset_nodes()
    for name in materialisable:
        assert nodes[name]["stale"] == "FRESH", (name, nodes[name]["causes"])
        expected = auto["runId"] if name in chain else initial["runId"]
        assert nodes[name]["latest_run"] == expected, name

    # ...and it stays at one: the next sensor tick after the run launches nothing more.
    server.wait_for_quiet_tick(after=auto["endTime"])
    runs = server.runs()
    assert len(runs) == 2 and {r["runId"] for r in runs} == {initial["runId"], auto["runId"]}
    assert all(r["status"] == "SUCCESS" for r in runs)
    # The dataset's metrics over time, as the UI's asset page plots them: one point per materialisation.
    history = server.metric_history("evaluation_metrics", "mAP")
    assert [run for run, _ in history] == [initial["runId"], auto["runId"]]
    assert all(0.0 <= value <= 1.0 for _, value in history)
    server.remember_processes()
    assert time.time() > auto["endTime"]
