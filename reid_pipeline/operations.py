"""Keeping a Dagster instance healthy through crashes (Dagster side).

* :func:`init_instance` — create a ``DAGSTER_HOME``'s storage once, under a file lock, and set the
  pool limits explicitly. Two first runs on a never-used SQLite home otherwise race on the schema
  (alembic "more than one head"), and a pool that exists only as ``default_limit`` is created lazily
  by the first claim, which two runs can both win. ``make setup`` and the test fixtures call it.
* :func:`reap_dead_runs` — a run whose whole process tree was killed (``kill -9``, OOM, a reboot)
  stays STARTED forever and keeps its ``gpu`` pool slot, so every later training step waits for
  ever. A run is dead when the process that executes its steps, recorded in the event log, no longer
  exists on the host that recorded it (``reid/host`` run tag, set by every step). Dead runs are
  marked failed and their slots freed; rematerialising then resumes from the last checkpoint. It runs
  without the daemon at the start of every CLI materialisation (``dagster asset materialize``, ``dg
  launch``, ``dagster job execute``), with the daemon in ``reap_dead_runs_sensor`` every 30 s, and by
  hand: ``python -m reid_pipeline.operations reap``.
* :func:`patch_pool_wait` — Dagster 1.13's multiprocess executor spins at 100 % of a core while a
  step waits for a pool slot and nothing else runs; the patch sleeps until the next claim check.
* :func:`patch_slot_claim` — Dagster claims a pool slot by selecting a free slot row ``FOR UPDATE``
  and then writing the claim by row id; SQLite ignores ``FOR UPDATE``, so two runs asking at the same
  instant both select the one free ``gpu`` slot and both "claim" it (the second overwrites the first)
  and train at once. The patch makes the write a compare-and-set (only while the row is still free),
  which SQLite's serialised writes make atomic; the loser waits like any blocked step.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import dagster as dg

__all__ = [
    "HOST_TAG",
    "EXECUTOR_PID_TAG",
    "init_instance",
    "record_run_worker",
    "dead_runs",
    "reap_dead_runs",
    "reap_on_cli_start",
    "patch_pool_wait",
    "patch_slot_claim",
    "reap_dead_runs_sensor",
]

HOST_TAG = "reid/host"
EXECUTOR_PID_TAG = "reid/executor_pid"
_ACTIVE = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
DEFAULT_POOLS = {"gpu": 1}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_instance(home: str | os.PathLike | None = None, pools: Mapping[str, int] | None = None) -> Path:
    """Initialise the instance in ``home`` (default ``$DAGSTER_HOME``) once; idempotent and safe to call
    concurrently. Sets each pool's limit (default ``gpu: 1``; ``REID_GPU_SLOTS`` overrides) unless the
    instance already holds one (``dagster instance concurrency set`` wins)."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or "").expanduser()
    if not str(home) or not (home / "dagster.yaml").is_file():
        raise FileNotFoundError(f"DAGSTER_HOME {str(home)!r}: expected a folder holding dagster.yaml")
    if pools is None:
        pools = dict(DEFAULT_POOLS)
        if os.environ.get("REID_GPU_SLOTS"):
            pools["gpu"] = int(os.environ["REID_GPU_SLOTS"])
    with _locked(home / ".reid-init.lock"):
        with dg.DagsterInstance.from_config(str(home)) as instance:
            instance.upgrade()  # creates or migrates the schema, once, under the lock
            storage = instance.event_log_storage
            for pool, slots in pools.items():
                if pool not in storage.get_concurrency_keys():
                    storage.set_concurrency_slots(pool, int(slots))
    return home


def record_run_worker(instance: dg.DagsterInstance, run_id: str) -> None:
    """Tag ``run_id`` with this host (called in every step; idempotent)."""
    run = instance.get_run_by_id(run_id)
    if run is not None and run.tags.get(HOST_TAG) != socket.gethostname():
        instance.add_run_tags(run_id, {HOST_TAG: socket.gethostname()})


def _executor_pid(instance: dg.DagsterInstance, run: dg.DagsterRun) -> int | None:
    """The pid of the process that executes the run's steps, from the event log."""
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = record.dagster_event.event_specific_data if record.dagster_event else None
        pid = getattr(data, "metadata", {}).get("pid") if data is not None else None
        text = (record.user_message or "") + " " + (record.dagster_event.message or "" if record.dagster_event else "")
        if pid is not None and "parent process" in text:
            return int(pid.value)
    for record in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):  # in-process executor
        if record.dagster_event is not None and record.dagster_event.pid:
            return int(record.dagster_event.pid)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a reused pid that is not a Python process is not the run's worker
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"python" in cmdline or b"dagster" in cmdline


def _is_local_storage(instance: dg.DagsterInstance) -> bool:
    return type(instance.run_storage).__name__.startswith("Sqlite")


def dead_runs(instance: dg.DagsterInstance) -> list[tuple[dg.DagsterRun, int]]:
    """STARTING/STARTED/CANCELING runs whose executing process is gone from this host."""
    host = socket.gethostname()
    dead = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=_ACTIVE)):
        if run.tags.get(HOST_TAG, host if _is_local_storage(instance) else None) != host:
            continue  # a run of another host (a shared Postgres): its own host decides
        pid = _executor_pid(instance, run)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            dead.append((run, pid))
    return dead


def _slots_of_finished_runs(instance: dg.DagsterInstance) -> set[str]:
    """Runs that have ended (failed, canceled, succeeded, deleted) but still hold pool slots — e.g. a run
    whose worker was killed and that the code server then marked failed without freeing them."""
    storage = instance.event_log_storage
    holders = {slot.run_id for key in storage.get_concurrency_keys()
               for slot in storage.get_concurrency_info(key).claimed_slots}
    active = {r.run_id for r in instance.get_runs(filters=dg.RunsFilter(run_ids=list(holders), statuses=_ACTIVE))} \
        if holders else set()
    return holders - active


def reap_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark :func:`dead_runs` failed and free their pool slots, and free the slots that ended runs still
    hold; returns the ids of the runs whose slots were freed."""
    reaped = []
    for run, pid in dead_runs(instance):
        message = (f"run {run.run_id} marked failed by reid_pipeline: its worker process {pid} on "
                   f"{socket.gethostname()} is gone (killed?); its pool slots are freed — rematerialise to resume")
        instance.report_run_failed(run, message)
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log(message)
        reaped.append(run.run_id)
    for run_id in sorted(_slots_of_finished_runs(instance)):
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        log(f"run {run_id} has ended but still held pool slots: freed by reid_pipeline")
        reaped.append(run_id)
    return reaped


_CLI_RUNS = ({"asset", "materialize"}, {"job", "execute"}, {"launch"})


def reap_on_cli_start(argv: list[str] | None = None) -> list[str]:
    """In a CLI process that is about to execute a run on ``$DAGSTER_HOME``, reap dead runs first."""
    argv = sys.argv if argv is None else argv
    words = {Path(a).name for a in argv[:4]} | set(argv[1:4])
    if not os.environ.get("DAGSTER_HOME") or not any(cmd <= words for cmd in _CLI_RUNS):
        return []
    try:
        with dg.DagsterInstance.get() as instance:
            return reap_dead_runs(instance, log=lambda m: print(m, file=sys.stderr))
    except Exception as exc:  # never block a run because the check itself failed
        print(f"reid_pipeline: could not check for dead runs ({type(exc).__name__}: {exc})", file=sys.stderr)
        return []


def _reap_interval() -> int:
    from reid_pipeline.retrain import env_seconds

    return env_seconds("REID_REAP_INTERVAL_S", 30)


@dg.sensor(name="reap_dead_runs_sensor", minimum_interval_seconds=_reap_interval(), default_status=dg.DefaultSensorStatus.RUNNING,
           description="Marks runs whose worker process died (kill -9, OOM) failed and frees their gpu pool slots "
                       "(every REID_REAP_INTERVAL_S, default 30 s).")
def reap_dead_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    reaped = reap_dead_runs(context.instance, log=context.log.warning)
    return dg.SkipReason(f"reaped {len(reaped)} dead run(s): {', '.join(reaped)}" if reaped else "no dead runs")


def patch_pool_wait() -> bool:
    """Make a run whose only remaining steps wait for a pool slot sleep instead of spinning.

    The one use of private executor API in the project (``ActiveExecution.concurrency_event_iterator``);
    ``test_pool_wait_patch`` fails loudly when a Dagster upgrade moves it. Returns True when applied.
    """
    from dagster._core.execution.plan.active import ActiveExecution

    original = ActiveExecution.concurrency_event_iterator
    if getattr(original, "_reid_patched", False):
        return True

    @functools.wraps(original)
    def concurrency_event_iterator(self, step_context):
        yield from original(self, step_context)
        concurrency = getattr(self, "_instance_concurrency_context", None)
        if concurrency is not None and concurrency.has_pending_claims() and not self._in_flight:
            time.sleep(min(max(self.sleep_interval(), 0.05), 1.0))

    concurrency_event_iterator._reid_patched = True  # type: ignore[attr-defined]
    ActiveExecution.concurrency_event_iterator = concurrency_event_iterator
    return True


def patch_slot_claim() -> bool:
    """Claim a pool slot only if it is still free when the claim is written (see the module docstring).

    Private storage API (``SqlEventLogStorage._claim_concurrency_slot``), replaced by the same query with
    ``step_key IS NULL`` added to the update; ``test_slot_claim_is_compare_and_set`` fails loudly when a
    Dagster upgrade moves it. The original stays reachable as ``_reid_original``. Returns True when applied.
    """
    from dagster._core.storage.event_log import sql_event_log as sql

    original = sql.SqlEventLogStorage._claim_concurrency_slot
    if getattr(original, "_reid_patched", False):
        return True
    slots = sql.ConcurrencySlotsTable

    @functools.wraps(original)
    def _claim_concurrency_slot(self, concurrency_key: str, run_id: str, step_key: str):
        free = sql.db.and_(slots.c.concurrency_key == concurrency_key, slots.c.step_key == None,  # noqa: E711
                           slots.c.deleted == False)  # noqa: E712
        with self.index_connection() as conn:
            while True:  # each lost race means another claimer took a slot: this ends when none is free
                row = conn.execute(sql.db_select([slots.c.id]).select_from(slots).where(free)
                                   .with_for_update(skip_locked=True).limit(1)).fetchone()
                if not row or not row[0]:
                    return sql.ConcurrencySlotStatus.BLOCKED
                won = conn.execute(slots.update().values(run_id=run_id, step_key=step_key)
                                   .where(sql.db.and_(slots.c.id == row[0], free))).rowcount
                if won:
                    return sql.ConcurrencySlotStatus.CLAIMED

    _claim_concurrency_slot._reid_patched = True  # type: ignore[attr-defined]
    _claim_concurrency_slot._reid_original = original  # type: ignore[attr-defined]
    sql.SqlEventLogStorage._claim_concurrency_slot = _claim_concurrency_slot
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_pipeline.operations", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="initialise $DAGSTER_HOME (schema, pool limits) once")
    init.add_argument("--home", default=None)
    sub.add_parser("reap", help="mark runs whose worker died failed and free their pool slots")
    args = parser.parse_args(argv)
    if args.command == "init":
        print(f"initialised {init_instance(args.home)}")
        return 0
    with dg.DagsterInstance.get() as instance:
        reaped = reap_dead_runs(instance)
    print(f"{len(reaped)} dead run(s) reaped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
