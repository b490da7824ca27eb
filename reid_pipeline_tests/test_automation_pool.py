"""One GPU shared safely: with the project's dagster.yaml, two runs never execute a ``gpu``-pool step at once
(not even for two different datasets: the pool is per instance, not per partition)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import dagster as dg

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
    from reid_pipeline.partitions import dataset_partitions

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
