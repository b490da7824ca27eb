"""Operations under faults: fresh homes, the GPU pool from the first run, a waiting step, killed runs.

Each case reproduces what a user saw and checks the fix:
* two first runs on a fresh DAGSTER_HOME (the set-up initialises it once, under a lock);
* the pool limit holds from the first run (set explicitly at initialisation);
* a step waiting for the pool sleeps (Dagster 1.13's executor spins at 100 % of a core without the patch);
* a run whose whole process tree is killed is reaped, freeing its slot, and the next run proceeds;
* two runs never share one resumable training state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dagster as dg
import pytest

from reid_pipeline.operations import init_instance, reap_dead_runs
from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env

pytestmark = pytest.mark.faults
DAGSTER = str(Path(sys.executable).with_name("dagster"))
DATASET = "synthetic-ci"  # one of the default dataset partitions, pointed at the test's own folders


def _fresh_home(tmp_path: Path, name: str = "home") -> Path:
    home = tmp_path / name
    home.mkdir()
    shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


# A tiny code location: a `gpu`-pool step that holds its slot for HOLD seconds (path in $HOLD_FILE).
DEFS = textwrap.dedent(
    """
    import os, time
    from pathlib import Path
    import dagster as dg
    from reid_pipeline.operations import patch_pool_wait, reap_on_cli_start
    from reid_pipeline.pools import GPU_POOL

    if os.environ.get("REID_TEST_PATCH", "1") == "1":
        patch_pool_wait()
    reap_on_cli_start()

    @dg.asset(pool=GPU_POOL)
    def train() -> None:
        Path(os.environ["STARTED_FILE"]).write_text(str(os.getpid()))
        time.sleep(float(os.environ.get("HOLD", "0")))

    defs = dg.Definitions(assets=[train])
    """
)


def _launch(defs: Path, home: Path, tmp_path: Path, tag: str, hold: float, patch: bool = True) -> subprocess.Popen:
    env = cli_env(home)
    env.update(HOLD=str(hold), STARTED_FILE=str(tmp_path / f"started-{tag}"), REID_TEST_PATCH="1" if patch else "0")
    return subprocess.Popen([DAGSTER, "asset", "materialize", "-f", str(defs), "--select", "train"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout:.0f} s")
        time.sleep(0.2)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _end(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    return proc.communicate(timeout=60)[0]


def test_init_is_idempotent_and_concurrent_first_runs_are_safe(tmp_path):
    """Initialising twice at once is safe; then two CLI runs started together on the new home both succeed
    (without the initialisation they raced on the SQLite schema: alembic 'more than one head')."""
    home = _fresh_home(tmp_path)
    inits = [subprocess.Popen([sys.executable, "-m", "reid_pipeline.operations", "init", "--home", str(home)],
                              cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in inits]
    assert [p.returncode for p in inits] == [0, 0], outs
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    runs = [_launch(defs, home, tmp_path, tag, hold=0.0) for tag in ("a", "b")]
    logs = [p.communicate(timeout=300)[0] for p in runs]
    assert [p.returncode for p in runs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert not any("more than one head" in log for log in logs)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert len(instance.get_runs()) == 2


def test_pool_limit_holds_from_the_first_run(tmp_path):
    home = _fresh_home(tmp_path)
    init_instance(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        info = instance.event_log_storage.get_concurrency_info("gpu")
        assert info.slot_count == 1  # an explicit row before any run asks: no first-claim race
    init_instance(home, pools={"gpu": 3})  # an existing limit (e.g. `dagster instance concurrency set`) wins
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("patch", [False, True], ids=["dagster-as-is", "patched"])
def test_a_step_waiting_for_the_pool_costs_next_to_nothing(tmp_path, patch):
    home = _fresh_home(tmp_path)
    init_instance(home)
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    holder = _launch(defs, home, tmp_path, "a", hold=60.0)  # killed below once measured
    try:
        _wait_for(tmp_path / "started-a")
        waiter = _launch(defs, home, tmp_path, "b", hold=0.0, patch=patch)
        try:
            time.sleep(4.0)  # let it load and start waiting for the slot
            # The least busy of four 3-s windows: a spinning executor is busy in every one, while start-up
            # work (imports, instance load on a slow 2-core CI machine) only inflates the first ones.
            shares = []
            for _ in range(4):
                before, t0 = _cpu_seconds(waiter.pid), time.time()
                time.sleep(3.0)
                shares.append((_cpu_seconds(waiter.pid) - before) / (time.time() - t0))
            share = min(shares)
            assert not (tmp_path / "started-b").exists()  # it really was waiting
        finally:
            _end(waiter)
    finally:
        _end(holder)
    if patch:
        assert share < 0.15, f"a waiting run used {share:.0%} of a core (windows: {shares})"
    else:  # reproduces the fault; if this fails, Dagster fixed it upstream and patch_pool_wait can go
        # The mean of the last three windows: on two cores shared with other test workers a spinning process
        # got 0.49 of a core in one window (0.94 and 0.81 in the others); a waiting one stays under 0.15 in all.
        spin = sum(shares[1:]) / len(shares[1:])
        assert spin > 0.4, f"unpatched Dagster no longer spins ({spin:.0%} of a core; windows: {shares})"


@pytest.mark.slow
def test_killed_run_is_reaped_and_frees_the_gpu_slot(tmp_path):
    """kill -9 of a whole CLI process tree while it holds the `gpu` slot: the next CLI run reaps it (marks it
    failed, frees the slot) and runs at once — no `dagster run delete`, no daemon."""
    home = _fresh_home(tmp_path)
    init_instance(home)
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS)
    victim = _launch(defs, home, tmp_path, "a", hold=600.0)
    _wait_for(tmp_path / "started-a")
    os.killpg(victim.pid, 9)
    victim.communicate(timeout=60)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.STARTED  # what Dagster leaves behind
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    nxt = _launch(defs, home, tmp_path, "b", hold=0.0)
    out = nxt.communicate(timeout=300)[0]
    assert nxt.returncode == 0, out[-4000:]
    assert "marked failed by reid_pipeline" in out and "blocked by limit" not in out
    with dg.DagsterInstance.from_config(str(home)) as instance:
        statuses = sorted(r.status.value for r in instance.get_runs())
        assert statuses == ["FAILURE", "SUCCESS"]
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert reap_dead_runs(instance) == []  # nothing left to reap


def test_reaper_leaves_live_and_foreign_runs_alone(tmp_path):
    from dagster._core.events import EngineEventData  # the event the multiprocess executor writes

    home = _fresh_home(tmp_path)
    init_instance(home)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live run worker
    with dg.DagsterInstance.from_config(str(home)) as instance:
        live = dg.DagsterRun(job_name="j", run_id="live-run", status=dg.DagsterRunStatus.STARTED,
                             tags={"reid/host": os.uname().nodename})
        foreign = dg.DagsterRun(job_name="j", run_id="foreign-run", status=dg.DagsterRunStatus.STARTED,
                                tags={"reid/host": "another-host"})
        for run in (live, foreign):
            instance.add_run(run)
            instance.report_engine_event("Executing steps using multiprocess executor: parent process (pid: %d)"
                                         % (worker.pid if run is live else 999_999), run,
                                         EngineEventData(metadata={"pid": dg.MetadataValue.text(
                                             str(worker.pid if run is live else 999_999))}))
        try:
            assert reap_dead_runs(instance) == []  # alive here; the other belongs to another host
            assert {r.status for r in instance.get_runs()} == {dg.DagsterRunStatus.STARTED}
        finally:
            worker.kill()
            worker.wait()
        assert reap_dead_runs(instance) == ["live-run"]  # its worker is gone now


def test_two_steps_never_share_a_resumable_state(tmp_path):
    """The training assets hold their resume folder (one per dataset) exclusively; a second holder of the
    same dataset fails at once, naming it."""
    from reid_pipeline.assets._common import resume_state
    from reid_pipeline.resources import ReidSettings

    reid = ReidSettings(datasets={DATASET: str(tmp_path)}, clip_weights="x.pt", storage_dir=str(tmp_path / "store"))

    class Ctx:  # what resume_state reads from an AssetExecutionContext (a step of one dataset)
        asset_key = dg.AssetKey("visual_encoder")
        run = dg.DagsterRun(job_name="j", run_id="first-run")
        has_partition_key = True
        partition_key = DATASET

        class log:
            info = staticmethod(lambda _m: None)

    with resume_state(Ctx, reid, "same", "inputs") as state:
        state.write_bytes(b"x")
        # storage/<asset>/<dataset>/_resume/<key>/state.safetensors
        assert state.parent.parent == tmp_path / "store" / "visual_encoder" / DATASET / "_resume", state
        script = f"""
                import dagster as dg
                from reid_pipeline.assets._common import resume_state
                from reid_pipeline.resources import ReidSettings
                import sys
                reid = ReidSettings(datasets={{sys.argv[1]: {str(tmp_path)!r}}}, clip_weights="x.pt",
                                    storage_dir={str(tmp_path / 'store')!r})
                class Ctx:
                    asset_key = dg.AssetKey("visual_encoder")
                    run = dg.DagsterRun(job_name="j", run_id="second-run")
                    has_partition_key = True
                    partition_key = sys.argv[1]
                    class log:
                        info = staticmethod(print)
                with resume_state(Ctx, reid, "same", "inputs") as state:
                    print(state)
            """

        def second_holder(dataset: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", textwrap.dedent(script), dataset], cwd=PROJECT_ROOT,
                                  capture_output=True, text=True, timeout=120)

        second = second_holder(DATASET)
        assert second.returncode != 0
        assert "another step is training from the same inputs" in second.stderr and "first-run" in second.stderr
        other = second_holder("synthetic")  # another dataset's step: a state of its own, no conflict
        assert other.returncode == 0, other.stderr[-3000:]
        assert "/visual_encoder/synthetic/_resume/" in other.stdout, other.stdout
    assert not state.exists()  # finished: the state is removed
    with resume_state(Ctx, reid, "same", "inputs"):  # and the lock died with its holder
        pass


# Four training runs requested by a sensor (as automation launches them: one run per dataset partition),
# through the daemon's queue. Each `train` step holds the gpu slot ~HOLD s in ticks, recording progress
# (per dataset) so that a relaunch resumes.
QUEUE_DEFS = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path
    import dagster as dg
    from reid_pipeline.operations import patch_pool_wait, reap_dead_runs_sensor
    from reid_pipeline.pools import GPU_POOL

    patch_pool_wait()
    OUT = Path(os.environ["QUEUE_OUT"])
    datasets = dg.StaticPartitionsDefinition(["a", "b", "c", "d"])

    @dg.asset(pool=GPU_POOL, partitions_def=datasets)
    def train(context: dg.AssetExecutionContext) -> None:
        name = context.partition_key
        progress = OUT / f"progress-{name}"
        done = int(progress.read_text()) if progress.exists() else 0
        start = time.time()
        (OUT / f"pid-{name}").write_text(json.dumps([os.getpid(), os.getppid()]))
        for tick in range(done, 8):
            time.sleep(0.5)
            progress.write_text(str(tick + 1))
        context.add_output_metadata({"resumed_from": done})
        with open(OUT / "intervals.jsonl", "a") as fh:
            fh.write(json.dumps([name, start, time.time(), done]) + "\\n")

    job = dg.define_asset_job("train_job", selection=[train], partitions_def=datasets)

    @dg.sensor(job=job, minimum_interval_seconds=1, default_status=dg.DefaultSensorStatus.RUNNING)
    def queue_sensor(context):
        names = ["a", "b", "c", "d"] + (["b"] if (OUT / "relaunch").exists() else [])
        return [dg.RunRequest(run_key=f"{n}-{i}", partition_key=n, tags={"queue/name": n})
                for i, n in enumerate(names)]

    defs = dg.Definitions(assets=[train], jobs=[job], sensors=[queue_sensor, reap_dead_runs_sensor])
    """
)


@pytest.mark.slow
def test_a_queue_of_four_training_runs_survives_one_killed(tmp_path):
    from reid_pipeline_tests.ui_server import descendants, free_port, wait_until

    home = _fresh_home(tmp_path)
    init_instance(home)
    out = tmp_path / "out"
    out.mkdir()
    defs = tmp_path / "queue_defs.py"
    defs.write_text(QUEUE_DEFS)
    env = cli_env(home)
    env.update(QUEUE_OUT=str(out), REID_REAP_INTERVAL_S="2", PYTHONWARNINGS="ignore", TMPDIR=str(tmp_path))
    log = open(tmp_path / "dev.log", "wb")
    dev = subprocess.Popen([DAGSTER, "dev", "-f", str(defs), "-h", "127.0.0.1", "-p", str(free_port())], cwd=tmp_path,
                           env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()

    def runs():
        with dg.DagsterInstance.from_config(str(home)) as instance:
            return {r.run_id: r for r in instance.get_runs()}

    def waiting_for(predicate, what: str, timeout: float = 600):
        try:
            return wait_until(predicate, timeout, what)
        except BaseException as exc:  # say where the queue stood
            states = sorted((r.tags.get("queue/name", "?"), r.status.value) for r in runs().values())
            tail = (tmp_path / "dev.log").read_text(errors="replace")[-4000:]
            raise AssertionError(f"{exc}\nruns: {states}\nprogress: "
                                 f"{[(p.name, p.read_text()) for p in sorted(out.glob('progress-*'))]}\n{tail}") from None

    try:
        # b trains second; kill its whole run worker halfway (the step and the run process)
        waiting_for(lambda: (out / "progress-b").exists() and int((out / "progress-b").read_text() or 0) >= 3,
                    "run b halfway")
        step_pid, worker_pid = json.loads((out / "pid-b").read_text())
        for pid in (step_pid, worker_pid):
            os.kill(pid, 9)
        waiting_for(lambda: sum(r.status == dg.DagsterRunStatus.SUCCESS for r in runs().values()) == 3,
                    "the three other runs to finish")
        killed = [r for r in runs().values() if r.tags.get("queue/name") == "b"]
        assert [r.status for r in killed] == [dg.DagsterRunStatus.FAILURE]  # reaped by the sensor, not left STARTED
        assert all(r.tags.get("dagster/partition") == r.tags["queue/name"] for r in runs().values())  # one run per dataset
        (out / "relaunch").touch()
        waiting_for(lambda: sum(r.status == dg.DagsterRunStatus.SUCCESS for r in runs().values()) == 4,
                    "the relaunched run to finish")
    finally:
        survivors = descendants(dev.pid)
        os.killpg(dev.pid, 15)
        try:
            dev.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, 9)
            dev.wait(timeout=20)
        for pid in survivors:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    intervals = sorted((json.loads(line) for line in (out / "intervals.jsonl").read_text().splitlines()), key=lambda x: x[1])
    names = [name for name, *_ in intervals]
    assert sorted(names) == ["a", "b", "c", "d"]
    for (_, _, end, _), (_, start, _, _) in zip(intervals, intervals[1:]):
        assert end <= start + 0.2, f"two training steps overlapped: {intervals}"  # the pool serialised them
    resumed = {name: done for name, _, _, done in intervals}
    assert resumed["b"] >= 3 and all(resumed[n] == 0 for n in "acd")  # b resumed from its progress
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots  # no slot leaked


def test_slots_of_ended_runs_are_freed(tmp_path):
    """A run the code server marked failed after its worker was killed keeps its slot (Dagster frees it only
    with run monitoring); the reaper frees it, so queued runs can start."""
    home = _fresh_home(tmp_path)
    init_instance(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ended = dg.DagsterRun(job_name="j", run_id="ended-run", status=dg.DagsterRunStatus.FAILURE)
        instance.add_run(ended)
        assert instance.event_log_storage.claim_concurrency_slot("gpu", "ended-run", "train").is_claimed
        assert instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert reap_dead_runs(instance, log=lambda _m: None) == ["ended-run"]
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
