"""The production instance: ``deploy/postgres/dagster.yaml`` against a real PostgreSQL server.

A temporary cluster (``postgres_server.PostgresServer``) holds the instance of a real ``dg dev``
(webserver, daemon, code server, run workers; ``ui_server.DagsterDev`` with that dagster.yaml). On it:
the full graph materialises on the CI preset; a change of the dataset makes the retrain sensor launch
exactly one run; while that run trains, the ``gpu`` pool's slot is held in PostgreSQL's own tables;
and after the first server is gone, a second ``dg dev`` on the same database sees the same history
(and its sensor, reading the cursor and versions from PostgreSQL, launches nothing).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

from reid_pipeline_tests.conftest import PROJECT_ROOT
from reid_pipeline_tests.postgres_server import PostgresServer
from reid_pipeline_tests.test_ui_e2e import _add_image_atomically
from reid_pipeline_tests.ui_server import (
    JOB,
    RETRAIN_SENSOR,
    DagsterDev,
    materialized_pipeline,
    wait_until,
)

POSTGRES_INSTANCE = PROJECT_ROOT / "deploy" / "postgres" / "dagster.yaml"
EMBEDDED_INSTANCE = PROJECT_ROOT / "dagster_home" / "dagster.yaml"
GPU_POOL = "gpu"


class PostgresDagsterDev(DagsterDev):
    """``dg dev`` (code location "reid_pipeline", from pyproject's ``[tool.dg]``) on the Postgres instance.

    ``shared_with``: another server whose data, weights and artefacts this one uses (same folders,
    so the same source fingerprints)."""

    location = "reid_pipeline"

    def __init__(self, root: Path, postgres: PostgresServer, shared_with: DagsterDev | None = None):
        super().__init__(root=root)
        self.postgres = postgres
        self.shared_with = shared_with

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("dg")), "dev", "-h", "127.0.0.1", "-p", str(self.port)]

    def prepare(self) -> None:
        if self.shared_with is None:
            super().prepare()
        else:
            (self.root / "home").mkdir(parents=True)
            (self.root / "tmp").mkdir()
        (self.root / "home" / "dagster.yaml").write_text(POSTGRES_INSTANCE.read_text())

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(self.postgres.env())
        # One process per run instead of one per step (each would import torch again: ~10-20 s a
        # step on 2 busy cores). The instance, its queue and the gpu pool's slots work the same way.
        env["REID_EXECUTOR"] = "in_process"
        if self.shared_with is not None:
            other = self.shared_with.env()
            for name in ("REID_DATASETS", "REID_CLIP_WEIGHTS", "REID_STORAGE_DIR"):
                env[name] = other[name]
        return env


def test_postgres_instance_keeps_the_embedded_queue_and_pools():
    """The Postgres instance differs from the embedded one in its storage only."""
    postgres, embedded = (yaml.safe_load(p.read_text()) for p in (POSTGRES_INSTANCE, EMBEDDED_INSTANCE))
    for section in ("run_coordinator", "concurrency"):
        assert postgres[section] == embedded[section], section
    connection = postgres["storage"]["postgres"]["postgres_db"]
    assert set(connection) == {"hostname", "port", "username", "password", "db_name", "scheme"}
    assert connection["scheme"] == "postgresql+psycopg2"  # the driver dagster-postgres installs
    assert "storage" not in embedded  # SQLite stays the embedded default


@pytest.fixture()
def postgres():
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _stopped(server: DagsterDev) -> None:
    server.stop()
    assert server.survivors() == [], f"processes outlived dg dev: {server.survivors()}"


@pytest.mark.slow
def test_pipeline_on_a_postgres_instance(postgres: PostgresServer, tmp_path):
    first = PostgresDagsterDev(tmp_path / "first", postgres)
    try:
        first.start()
        assert first.instigator_status(RETRAIN_SENSOR) == "RUNNING"

        # 1. The full graph on the CI preset (one run of reid_pipeline_job through GraphQL).
        initial = materialized_pipeline(first)
        first.wait_for_quiet_tick(after=initial["endTime"])

        # 2. New data: exactly one automatic run; while it trains, its step holds the gpu slot in Postgres.
        _add_image_atomically(first)
        held: set[tuple[str, str]] = set()

        def automatic_run_done() -> dict | None:
            held.update(postgres.query(
                "SELECT run_id, step_key FROM concurrency_slots WHERE concurrency_key = %s "
                "AND run_id IS NOT NULL AND NOT deleted",
                (GPU_POOL,)))
            auto = [r for r in first.runs() if r["tags"].get("dagster/sensor_name") == RETRAIN_SENSOR]
            return auto[0] if auto and auto[0]["status"] in {"SUCCESS", "FAILURE", "CANCELED"} else None

        auto = wait_until(automatic_run_done, 900, "the automatic retraining run to finish", interval=0.2)
        assert auto["status"] == "SUCCESS", first.log_tail()
        assert auto["jobName"] == JOB and auto["tags"]["reid/trigger"] == "source changed"
        first.wait_for_quiet_tick(after=auto["endTime"])
        runs = first.runs()
        assert len(runs) == 2 and {r["runId"] for r in runs} == {initial["runId"], auto["runId"]}

        # The pool lives in Postgres: one slot (the instance's default limit), held by the training
        # steps of the automatic run while they ran, free again now.
        assert {run_id for run_id, _ in held} == {auto["runId"]}, held
        assert {step for _, step in held} <= {"prompt_checkpoint", "visual_encoder"} and held, held
        assert postgres.query("SELECT count(*), count(run_id) FROM concurrency_slots WHERE concurrency_key = %s "
                              "AND NOT deleted", (GPU_POOL,)) == [(1, 0)]
        assert postgres.query('SELECT "limit", using_default_limit FROM concurrency_limits WHERE concurrency_key = %s',
                              (GPU_POOL,)) == [(1, True)]
        # ...and so does the history: both runs, successful, in the runs table; no SQLite files in the home.
        stored = dict(postgres.query("SELECT run_id, status FROM runs"))
        assert stored == {initial["runId"]: "SUCCESS", auto["runId"]: "SUCCESS"}
        assert not list((first.root / "home").rglob("*.db")), list((first.root / "home").rglob("*.db"))
        history = {r["runId"]: r["status"] for r in runs}
        latest = {name: node["latest_run"] for name, node in first.asset_nodes().items() if node["materializable"]}
        assert set(latest.values()) == {initial["runId"], auto["runId"]}
    finally:
        _stopped(first)

    # 3. A second dg dev on the same database (and the same data folders) sees the same history.
    second = PostgresDagsterDev(tmp_path / "second", postgres, shared_with=first)
    try:
        started = time.time()
        second.start()
        assert {r["runId"]: r["status"] for r in second.runs()} == history
        nodes = second.asset_nodes()
        assert {name: node["latest_run"] for name, node in nodes.items() if node["materializable"]} == latest
        assert all(node["stale"] == "FRESH" for node in nodes.values() if node["materializable"])
        # Its daemon reads the sensor's recorded versions from Postgres: the unchanged data launches nothing.
        second.wait_for_quiet_tick(after=started)
        assert len(second.runs()) == 2
    finally:
        _stopped(second)
