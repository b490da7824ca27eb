"""A real ``dagster dev`` for the UI tests: temporary home, data and weights; GraphQL helpers; no leftovers.

``dagster dev`` (webserver + daemon + code server + run workers) runs in its own process group on
127.0.0.1 and a free port. It is ended with SIGTERM to the group, then SIGKILL after a grace period;
every process that belonged to it is checked to be gone. One server is shared by the UI test modules
(session fixture ``dagster_ui``); it is started on first use.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest

from reid_pipeline.retrain import load_run_preset
from reid_pipeline_tests.conftest import PROJECT_ROOT

LOCATION = "reid_pipeline.definitions"
REPOSITORY = "__repository__"
JOB = "reid_pipeline_job"
RETRAIN_SENSOR = "reid_retrain_sensor"
CI_PRESET = PROJECT_ROOT / "configs" / "ci.yaml"
CI_DATA = PROJECT_ROOT / "data" / "embedded" / "synthetic-ci"
DATASET = "synthetic-ci"  # the one dataset partition the server knows (REID_DATASETS); its runs carry its tag
CI_WEIGHTS = PROJECT_ROOT / "data" / "embedded" / "tiny_clip_vit.pt"
#: The full graph on the CI data takes minutes on 2 CPU cores; generous, but bounded.
RUN_TIMEOUT_S = float(os.environ.get("REID_UI_TEST_RUN_TIMEOUT_S", "1500"))
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (to tell a process from a later one reusing its id)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie is dead, only not yet reaped
        return None
    return fields[19]


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root``, with its start time (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        start = _proc_start_time(pid)
        if start is not None:
            out[pid] = start
        stack.extend(children.get(pid, []))
    return out


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class DagsterDev:
    """One ``dagster dev`` process group with a temporary home, data copy, weights copy and storage."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    known: dict[int, str] = field(default_factory=dict)
    initial_run: dict | None = None
    #: The code location's name in the UI (``dagster dev -m`` names it after the module).
    location: ClassVar[str] = LOCATION

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "dagster_dev.log"

    def prepare(self) -> None:
        if not CI_DATA.is_dir() or not CI_WEIGHTS.is_file():
            pytest.fail("embedded CI data or weights missing: run `make embedded` (make test does)")
        home = self.root / "home"
        home.mkdir(parents=True)
        shutil.copy(PROJECT_ROOT / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        shutil.copytree(CI_DATA, self.data_root)
        shutil.copy(CI_WEIGHTS, self.root / "clip.pt")
        (self.root / "tmp").mkdir()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DAGSTER_HOME=str(self.root / "home"),
            REID_DATASETS=f"{DATASET}={self.data_root}",
            REID_CLIP_WEIGHTS=str(self.root / "clip.pt"),
            REID_STORAGE_DIR=str(self.root / "artifacts"),
            REID_AUTOMATION="on",
            REID_OBSERVE_INTERVAL_S="2",  # the daemon's loop is 5 s anyway
            REID_RUN_CONFIG=str(CI_PRESET),  # automatic runs: the CI preset's op config
            TMPDIR=str(self.root / "tmp"),  # the code server's sockets and workspace file stay in here
            PYTHONWARNINGS="ignore",
            # one process per run rather than per step: each step process re-imports torch, which on two
            # cores is most of a small run's time (the pool and the queue behave the same)
            REID_EXECUTOR=os.environ.get("REID_EXECUTOR", "in_process"),
        )
        return env

    def start(self, timeout: float = 180) -> None:
        self.prepare()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=PROJECT_ROOT,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        atexit.register(self.stop)
        wait_until(self._location_loaded, timeout, f"dagster dev on {self.url} (log: {self.log_path})", interval=1)

    def command(self) -> list[str]:
        """The server's command line (run in the project root)."""
        dagster = str(Path(sys.executable).with_name("dagster"))
        return [dagster, "dev", "-m", LOCATION, "-h", "127.0.0.1", "-p", str(self.port)]

    def _location_loaded(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            data = self.graphql(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        entries = data["workspaceOrError"]["locationEntries"]
        for entry in entries:
            if entry["locationOrLoadError"] and entry["locationOrLoadError"]["__typename"] == "PythonError":
                pytest.fail(f"code location failed to load: {entry['locationOrLoadError']['message']}")
        return any(e["name"] == self.location and e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, then make sure all of it is gone."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        self.known.update(descendants(proc.pid))
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        for sig, wait_s in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not self._group_alive(pgid):
                break
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        # Anything that left the group (or was reparented) but was ours: end it by its pid.
        self.known.update(self._processes_with_our_home())
        for pid, start in self.known.items():
            if _proc_start_time(pid) == start:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(0.2)

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def survivors(self) -> list[int]:
        """Processes of this server still alive (zombies count as gone): those seen in its process tree,
        and any process whose environment names this server's DAGSTER_HOME (nothing can hide by leaving the group)."""
        alive = {pid for pid, start in self.known.items() if _proc_start_time(pid) == start}
        return sorted(alive | set(self._processes_with_our_home()))

    def _processes_with_our_home(self) -> dict[int, str]:
        marker = b"\0" + f"DAGSTER_HOME={self.root / 'home'}".encode() + b"\0"
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = b"\0" + (entry / "environ").read_bytes() + b"\0"
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            start = _proc_start_time(int(entry.name))
            if marker in environ and start is not None:
                found[int(entry.name)] = start
        return found

    def remember_processes(self) -> None:
        """Record the current process tree (run workers come and go)."""
        if self.proc is not None:
            self.known[self.proc.pid] = _proc_start_time(self.proc.pid) or ""
            self.known.update(descendants(self.proc.pid))

    # --- GraphQL ---------------------------------------------------------------------------------

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def launch_job(self, job: str = JOB, run_config: dict | None = None, partition: str | None = DATASET) -> str:
        """Launch ``job`` for one dataset partition (as the UI's launchpad does: the ``dagster/partition`` tag)."""
        tags = [{"key": "dagster/partition", "value": partition}] if partition else []
        data = self.graphql(
            """
            mutation Launch($params: ExecutionParams!) {
              launchPipelineExecution(executionParams: $params) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on PythonError { message }
                ... on RunConfigValidationInvalid { errors { message } }
              }
            }
            """,
            {
                "params": {
                    "selector": {"repositoryLocationName": self.location, "repositoryName": REPOSITORY, "pipelineName": job},
                    "runConfigData": run_config or {},
                    "mode": "default",
                    "executionMetadata": {"tags": tags},
                }
            },
        )["launchPipelineExecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def runs(self) -> list[dict]:
        """Every run, newest first: id, status, times, tags, asset selection."""
        data = self.graphql(
            "{ runsOrError { __typename ... on Runs { results { runId jobName status startTime endTime "
            "tags { key value } assetSelection { path } } } } }"
        )["runsOrError"]
        return [
            {**r, "tags": {t["key"]: t["value"] for t in r["tags"]}, "assets": {"/".join(a["path"]) for a in r["assetSelection"] or []}}
            for r in data["results"]
        ]

    def wait_for_run(self, run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
        def finished() -> dict | None:
            self.remember_processes()
            run = next((r for r in self.runs() if r["runId"] == run_id), None)
            return run if run and run["status"] in FINISHED else None

        run = wait_until(finished, timeout, f"run {run_id}", interval=2)
        assert run["status"] == "SUCCESS", f"run {run_id} ended {run['status']}:\n{self.log_tail()}"
        return run

    def asset_nodes(self, partition: str = DATASET) -> dict[str, dict]:
        """Every asset node by name: observable/materialisable, stale status and causes, parents, latest run —
        of ``partition`` for the per-dataset assets."""
        fields = ("assetKey { path } isObservable isMaterializable isPartitioned staleStatus@ARG@ "
                  "staleCauses@ARG@ { reason category key { path } dependency { path } } dependencyKeys { path } "
                  "assetMaterializations(@MARG@limit: 1) { runId timestamp }")
        plain = self.graphql("{ assetNodes { " + fields.replace("@ARG@", "").replace("@MARG@", "") + " } }")["assetNodes"]
        keys = [{"path": n["assetKey"]["path"]} for n in plain if n["isPartitioned"]]
        per_dataset = self.graphql(
            "query($keys: [AssetKeyInput!], $p: String!, $ps: [String!]) { assetNodes(assetKeys: $keys) { "
            + fields.replace("@ARG@", "(partition: $p)").replace("@MARG@", "partitions: $ps, ") + " } }",
            {"keys": keys, "p": partition, "ps": [partition]},
        )["assetNodes"] if keys else []
        nodes = [n for n in plain if not n["isPartitioned"]] + per_dataset
        out = {}
        for node in nodes:
            latest = node["assetMaterializations"]
            out["/".join(node["assetKey"]["path"])] = {
                "materializable": node["isMaterializable"],
                "partitioned": node["isPartitioned"],
                "observable": node["isObservable"],
                "stale": node["staleStatus"],
                "causes": node["staleCauses"],
                "parents": {"/".join(d["path"]) for d in node["dependencyKeys"]},
                "latest_run": latest[0]["runId"] if latest else None,
            }
        return out

    def metric_history(self, asset: str, label: str, partition: str = DATASET) -> list[tuple[str, float]]:
        """``(run id, value)`` of a float metadata entry over every materialisation of one partition, oldest
        first — what the UI's asset page plots over time."""
        nodes = self.graphql(
            "query($k: [AssetKeyInput!], $ps: [String!]) { assetNodes(assetKeys: $k) { assetMaterializations("
            "partitions: $ps) { runId timestamp metadataEntries { label ... on FloatMetadataEntry { floatValue } } } } }",
            {"k": [{"path": [asset]}], "ps": [partition]},
        )["assetNodes"]
        events = sorted(nodes[0]["assetMaterializations"], key=lambda e: float(e["timestamp"]))
        return [(e["runId"], next(m["floatValue"] for m in e["metadataEntries"] if m["label"] == label)) for e in events]

    def instigator_status(self, sensor: str) -> str:
        data = self.graphql(
            "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { __typename "
            "... on Sensor { sensorState { status } } } }",
            {"s": {"repositoryLocationName": self.location, "repositoryName": REPOSITORY, "sensorName": sensor}},
        )["sensorOrError"]
        return data["sensorState"]["status"]

    def sensor_ticks(self, sensor: str, limit: int = 10) -> list[dict]:
        data = self.graphql(
            "query($s: SensorSelector!, $n: Int) { sensorOrError(sensorSelector: $s) { __typename "
            "... on Sensor { sensorState { ticks(limit: $n) { status timestamp endTimestamp runIds } } } } }",
            {"s": {"repositoryLocationName": self.location, "repositoryName": REPOSITORY, "sensorName": sensor}, "n": limit},
        )["sensorOrError"]
        return data["sensorState"]["ticks"]

    def wait_for_quiet_tick(self, after: float, timeout: float = 120) -> dict:
        """Wait for a retrain-sensor tick that began after ``after`` (epoch s) and finished having launched nothing."""

        def quiet_tick() -> dict | None:
            for tick in self.sensor_ticks(RETRAIN_SENSOR):
                if tick["timestamp"] > after and tick["status"] in {"SKIPPED", "SUCCESS"}:
                    return tick
            return None

        tick = wait_until(quiet_tick, timeout, f"a {RETRAIN_SENSOR} tick after {after}", interval=1)
        assert tick["runIds"] == [], f"{RETRAIN_SENSOR} launched {tick['runIds']} with nothing changed"
        return tick


def downstream_of(nodes: dict[str, dict], source: str) -> set[str]:
    """The materialisable assets below ``source`` in the graph the server reports."""
    below: set[str] = set()
    frontier = {source}
    while frontier:
        frontier = {name for name, node in nodes.items() if node["parents"] & frontier and name not in below}
        below |= frontier
    return {name for name in below if nodes[name]["materializable"]}


_SERVER: DagsterDev | None = None


@pytest.fixture(scope="session")
def dagster_ui(tmp_path_factory) -> DagsterDev:
    """The shared ``dagster dev``, started on first use and stopped (with every child) at the end of the session."""
    global _SERVER
    if _SERVER is None:
        server = DagsterDev(root=tmp_path_factory.mktemp("dagster_ui"))
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        _SERVER = server
    yield _SERVER
    if _SERVER is not None:
        server, _SERVER = _SERVER, None
        server.stop()
        assert server.survivors() == [], f"processes outlived dagster dev: {server.survivors()}"


def materialized_pipeline(server: DagsterDev) -> dict:
    """The pipeline materialised once per server by a run of ``reid_pipeline_job`` launched through GraphQL,
    with the CI preset's op config (the same the automatic runs get through ``REID_RUN_CONFIG``)."""
    if server.initial_run is None:
        ops = load_run_preset(CI_PRESET)
        server.initial_run = server.wait_for_run(server.launch_job(JOB, {"ops": ops}))
    return server.initial_run
