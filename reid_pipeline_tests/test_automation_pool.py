"""One GPU shared safely: with the project's dagster.yaml, two runs never execute a ``gpu``-pool step at once
(not even for two different datasets: the pool is per instance, not per partition)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import dagster as dg

from reid_pipeline.operations import patch_slot_claim
from reid_pipeline.pools import GPU_OP_TAGS, GPU_POOL
from reid_pipeline_tests.conftest import PROJECT_ROOT

# A stand-in training step, partitioned by dataset like the real ones: holds the pool's slot for 3 s and
# logs when (and for which dataset) it held it. Both processes meet at a barrier first, so they really ask
# for the slot at the same time.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import dagster as dg
    from reid_pipeline.operations import patch_slot_claim
    from reid_pipeline.partitions import dataset_partitions

    patch_slot_claim()  # as every process that loads reid_pipeline.definitions does

    home, pool, tags, out, me, other, dataset = sys.argv[1:]

    @dg.asset(pool=pool, op_tags=json.loads(tags), partitions_def=dataset_partitions)
    def train(context: dg.AssetExecutionContext) -> None:
        start = time.time()
        time.sleep(3.0)
        with open(out, "a") as fh:
            fh.write(json.dumps([start, time.time(), context.partition_key]) + "\\n")

    Path(me).touch()
    deadline = time.time() + 60
    while not Path(other).exists() and time.time() < deadline:
        time.sleep(0.05)
    with dg.DagsterInstance.from_config(home) as instance:
        ok = dg.materialize([train], instance=instance, partition_key=dataset).success
    sys.exit(0 if ok else 1)
    """
)


def test_project_instance_limits_the_gpu_pool_to_one_slot(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.pool_config.pool_granularity.value == "op"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"


def test_two_runs_never_train_at_once(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(home)):
        pass  # create the SQLite storage once, before two processes open it
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "intervals.jsonl"
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(home), GPU_POOL, json.dumps(GPU_OP_TAGS), str(out), str(me), str(other),
             dataset],
            env={k: v for k, v in os.environ.items() if not k.startswith("REID_")},  # the default datasets
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me, other, dataset in ((*ready, "synthetic"), (*ready[::-1], "synthetic-ci"))
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    (a_start, a_end, a_data), (b_start, b_end, b_data) = sorted(json.loads(line) for line in out.read_text().splitlines())
    assert {a_data, b_data} == {"synthetic", "synthetic-ci"}
    assert a_end <= b_start, f"training steps overlapped: [{a_start}, {a_end}] and [{b_start}, {b_end}]"
    # The second run's step waited for the slot (it was not merely late).
    assert any(f"blocked by limit for pool {GPU_POOL}" in log for log in logs)


def test_slot_claim_is_compare_and_set(tmp_path, monkeypatch):
    """The race the two-process test can lose, made deterministic: run A claims the one ``gpu`` slot between
    run B's select of the free slot and B's write. Dagster's own claim (SQLite ignores ``FOR UPDATE``) then
    overwrites A's claim and reports B CLAIMED too; the patched claim sees the slot taken and blocks B."""
    from dagster._core.storage.event_log import sql_event_log as sql

    assert patch_slot_claim()
    patched = sql.SqlEventLogStorage._claim_concurrency_slot
    slots = sql.ConcurrencySlotsTable

    def race(claim) -> tuple[object, list[tuple]]:
        home = tmp_path / f"home-{claim.__name__}-{id(claim)}"
        home.mkdir()
        shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        with dg.DagsterInstance.from_config(str(home)) as instance:
            storage = instance.event_log_storage
            storage.set_concurrency_slots(GPU_POOL, 1)
            connect = storage.index_connection
            fired = []

            class Racing:
                def __init__(self, conn):
                    self._conn = conn

                def __getattr__(self, name):
                    return getattr(self._conn, name)

                def execute(self, statement, *args, **kwargs):
                    result = self._conn.execute(statement, *args, **kwargs)
                    if not fired and statement.is_select:  # B has read the free slot: now A claims it
                        fired.append(True)
                        rows = result.fetchall()
                        self._conn.execute(slots.update().values(run_id="run-a", step_key="train-a")
                                           .where(slots.c.concurrency_key == GPU_POOL))
                        return type("Rows", (), {"fetchone": lambda _self: rows[0] if rows else None})()
                    return result

            @contextmanager
            def racing_connection():
                with connect() as conn:
                    yield Racing(conn)

            monkeypatch.setattr(storage, "index_connection", racing_connection)
            status = claim(storage, GPU_POOL, "run-b", "train-b")
            monkeypatch.setattr(storage, "index_connection", connect)
            with connect() as conn:
                holders = [tuple(r) for r in conn.execute(
                    sql.db_select([slots.c.run_id, slots.c.step_key]).where(slots.c.concurrency_key == GPU_POOL))]
            assert fired
            return status, holders

    status, holders = race(patched._reid_original)  # Dagster as is: both runs think they hold the slot
    assert status == sql.ConcurrencySlotStatus.CLAIMED and holders == [("run-b", "train-b")]
    status, holders = race(patched)
    assert status == sql.ConcurrencySlotStatus.BLOCKED and holders == [("run-a", "train-a")]
