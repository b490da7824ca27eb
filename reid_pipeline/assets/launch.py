"""How a training asset runs its step: in the step process, or on ``torchrun`` through Dagster Pipes.

The training assets take a ``launcher`` option (:class:`LauncherConfig`, part of their run config):

* ``in_process`` (default): the library step runs in the Dagster step process, as before; on a
  machine with several GPUs the step first takes one free GPU (:func:`gpu_devices`) instead of
  every step piling onto ``cuda:0``.
* ``torchrun``: the step's inputs (descriptor paths), output folder, state file and config go into
  a launch spec (``launch.yaml`` in the output folder); ``python -m torch.distributed.run … -m
  reid_pipeline.training.launch STAGE --config launch.yaml`` runs under
  ``dagster.PipesSubprocessClient``. Rank 0 streams its log lines back through Pipes and reports the
  materialisation (the descriptor path plus what it measured); this module turns that into the same
  ``(artifact, result, report)`` the in-process step returns, so the asset reports the very same
  metadata keys. A failed or killed worker fails the step with ``dg.Failure`` naming the rank and
  the error (from torchrun's failure summary); the resumable state keeps the last good epoch, and
  rematerialising resumes from it — at any world size.
* ``k8s``: the same entry point in one pod with ``nproc_per_node`` GPUs through dagster-k8s's
  ``PipesK8sClient`` (pod spec from :func:`k8s_base_pod_spec`); the storage folder must be a
  shared volume mounted at the same path in the pod.

GPUs are counted, not steps: Dagster 1.13 gives a step exactly one slot of its pool
(``claim_concurrency_slot(concurrency_key, run_id, step_key, priority)`` has no slot count), so the
``gpu`` pool limits how many training steps run at once, and :func:`gpu_devices` hands each step
``nproc_per_node`` distinct GPUs (one lock file per GPU index under the storage folder, taken
all-or-nothing, so two steps can never deadlock holding half each), exported to the workers as
``CUDA_VISIBLE_DEVICES``. A step waiting for GPUs logs it and polls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import dagster as dg
from pydantic import Field

from reid_pipeline.artifacts import Artifact, load_descriptor
from reid_pipeline.assets._common import Overrides
from reid_pipeline.device import DeviceSpec
from reid_pipeline.pipeline import encoder_step, prompts_step
from reid_pipeline.storage import write_json

__all__ = [
    "LauncherConfig",
    "Launchable",
    "gpu_devices",
    "torchrun_command",
    "describe_torchrun_failure",
    "k8s_base_pod_spec",
    "run_prompts_step",
    "run_encoder_step",
]

MODES = ("in_process", "torchrun", "k8s")


class LauncherConfig(dg.Config):
    """Where a training step runs (see the module docstring)."""

    mode: str = Field(default="in_process", description="in_process | torchrun | k8s")
    nproc_per_node: int = Field(default=1, ge=1, description="Worker processes per node (GPUs per node on GPUs).")
    nnodes: str = Field(default="1", description="Nodes: 'N' or elastic 'MIN:MAX' (torchrun --nnodes).")
    rdzv_backend: str = Field(default="c10d", description="torchrun rendezvous backend.")
    rdzv_endpoint: str = Field(default="", description="host:port of the rendezvous; empty = 127.0.0.1 and a free port "
                                                       "(single node).")
    rdzv_id: str = Field(default="", description="Job id shared by all nodes; empty = the Dagster run id.")
    local_addr: str = Field(default="127.0.0.1", description="This node's address for the other ranks (torchrun "
                                                             "--local-addr); empty = the host name.")
    max_restarts: int = Field(default=0, ge=0, description="torchrun restarts of the whole worker group after a failure.")
    sync_bn: bool = Field(default=False, description="BatchNorm over the global batch (SyncBatchNorm) in stage 2.")
    per_rank_batch: Optional[int] = Field(default=None, description="Per-rank batch; × world size must equal the "
                                                                    "global batch of the stage's config.")
    num_threads: int = Field(default=0, ge=0, description="torch CPU threads per worker (0 = torch's default).")
    gpu_wait_s: float = Field(default=3600.0, description="How long to wait for free GPUs before failing.")
    k8s_image: str = Field(default="", description="k8s: the image holding this project.")
    k8s_namespace: Optional[str] = Field(default=None, description="k8s: namespace of the training pod.")
    k8s_storage_claim: str = Field(default="", description="k8s: PersistentVolumeClaim holding the storage folder.")


class Launchable(Overrides):
    """A training asset's run config: the stage's overrides plus ``launcher`` (not a stage setting)."""

    launcher: LauncherConfig = Field(default_factory=LauncherConfig, description="in_process (default) | torchrun | k8s.")

    def overrides(self, *, exclude: set[str] = frozenset()) -> dict[str, Any]:
        return super().overrides(exclude=set(exclude) | {"launcher"})


# ----------------------------------------------------------------------------------- GPUs


def _visible_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@contextlib.contextmanager
def gpu_devices(lock_dir: Path, count: int, *, available: list[int] | None = None, wait_s: float = 3600.0,
                poll_s: float = 2.0, log=None, owner: str = "") -> Iterator[list[int]]:
    """``count`` GPU indices that no other step holds, for the duration of the block.

    One lock file per GPU index in ``lock_dir`` (``flock``: released when the process dies). All
    ``count`` are taken at once or none (no hold-and-wait, hence no deadlock between steps). With
    no GPU on this machine it yields ``[]``. Raises ``TimeoutError`` after ``wait_s``.
    """
    gpus = _visible_gpus() if available is None else list(available)
    if not gpus:
        yield []
        return
    if count > len(gpus):
        raise ValueError(f"{count} GPUs requested but this machine has {len(gpus)} ({gpus})")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline, said = time.monotonic() + wait_s, False
    while True:
        held: list[tuple[int, Any]] = []
        for index in gpus:
            handle = open(lock_dir / f"gpu-{index}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{owner} pid {os.getpid()}")
            handle.flush()
            held.append((index, handle))
            if len(held) == count:
                break
        if len(held) == count:
            break
        for _, handle in held:
            handle.close()  # all or nothing
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} free GPUs of {gpus} within {wait_s:.0f} s (locks in {lock_dir})")
        if log is not None and not said:
            log(f"waiting for {count} free GPUs of {gpus} (other training steps hold the rest)")
            said = True
        time.sleep(poll_s)
    try:
        yield [index for index, _ in held]
    finally:
        for _, handle in held:
            handle.close()


# ----------------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(launcher: LauncherConfig, stage: str, spec_path: Path, run_id: str) -> list[str]:
    """``python -m torch.distributed.run … -m reid_pipeline.training.launch STAGE --config SPEC``."""
    endpoint = launcher.rdzv_endpoint or f"127.0.0.1:{_free_port()}"
    if launcher.nnodes != "1" and not launcher.rdzv_endpoint:
        raise ValueError("launcher.nnodes > 1 needs launcher.rdzv_endpoint (host:port reachable from every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(launcher.nnodes),
           "--nproc-per-node", str(launcher.nproc_per_node), "--rdzv-backend", launcher.rdzv_backend,
           "--rdzv-endpoint", endpoint, "--rdzv-id", launcher.rdzv_id or run_id,
           "--max-restarts", str(launcher.max_restarts)]
    if launcher.local_addr:
        cmd += ["--local-addr", launcher.local_addr]
    return cmd + ["-m", "reid_pipeline.training.launch", stage, "--config", str(spec_path)]


_ENTRY = re.compile(r"^\[\d+\]:\s*$", re.M)
_PEER_ERROR = re.compile(r"Connection reset|Connection closed|remote worker|NCCL communicator was aborted|"
                         r"ProcessGroup\w* .*(?:timed out|aborted)|Broken pipe", re.I)


def _failures(output: str) -> list[dict[str, str]]:
    """Every worker failure of torchrun's summary (``Failures:`` and ``Root Cause`` blocks)."""
    marker = output.rfind("Failures:")
    text = output[marker:] if marker >= 0 else ""
    out = []
    for chunk in _ENTRY.split(text)[1:]:
        chunk = chunk.split("\n-----", 1)[0].split("\n=====", 1)[0]

        def field(name: str, chunk: str = chunk) -> str:
            match = re.search(rf"^\s*{name}\s*:\s*(.*)$", chunk, re.M)
            return match.group(1).strip() if match else "?"

        rank = re.search(r"(-?\d+)\s*\(local_rank:\s*(-?\d+)\)", field("rank"))
        trace = chunk.split("traceback :", 1)[1] if "traceback :" in chunk else ""
        lines = [line.strip() for line in trace.splitlines() if line.strip()]
        signal = re.search(r"\((SIG[A-Z]+)\)", field("exitcode"))
        out.append({
            "rank": rank.group(1) if rank else field("rank"), "local_rank": rank.group(2) if rank else "?",
            "host": field("host"), "signal": signal.group(1) if signal else "",
            "exitcode": field("exitcode").split()[0] if field("exitcode") != "?" else "?",
            "error": lines[-1] if lines else "no traceback",
        })
    return out


def describe_torchrun_failure(output: str) -> str:
    """Which rank failed first and why, from torchrun's failure summary.

    A worker killed by a signal other than SIGTERM, or one that raised anything but a lost-peer
    error, is the cause; ranks that only lost their peer (gloo/NCCL connection errors) or were
    stopped by torchrun (SIGTERM) are listed after it.
    """
    failures = _failures(output or "")
    if not failures:
        tail = [line for line in (output or "").strip().splitlines() if line.strip()][-5:]
        return "torchrun failed before a worker reported (last lines: " + " | ".join(tail) + ")"

    def consequential(f: dict[str, str]) -> bool:
        return f["signal"] == "SIGTERM" or bool(_PEER_ERROR.search(f["error"]))

    def say(f: dict[str, str]) -> str:
        how = f"killed by {f['signal']}" if f["signal"] else f"exit code {f['exitcode']}"
        return f"rank {f['rank']} (local rank {f['local_rank']}) on {f['host']} failed ({how}): {f['error']}"

    ordered = sorted(failures, key=consequential)
    rest = "; ".join(f"rank {f['rank']}" + (f" ({f['signal']})" if f["signal"] else "") for f in ordered[1:])
    return say(ordered[0]) + (f" — then stopped: {rest}" if rest else "")


def _spec(stage: str, inputs: dict[str, Artifact], out_dir: Path, cache_dir: Path, state_path: Path | None,
          config: dict[str, Any], spec: DeviceSpec, launcher: LauncherConfig) -> dict[str, Any]:
    return {
        "stage": stage, "inputs": {name: str(a.descriptor_path) for name, a in inputs.items()},
        "out_dir": str(out_dir), "cache_dir": str(cache_dir), "state_path": str(state_path) if state_path else None,
        "config": config,
        "device": {"device": "cuda" if spec.is_cuda else "cpu", "precision": spec.precision,
                   "num_threads": launcher.num_threads},
        "distributed": {"sync_bn": launcher.sync_bn, "per_rank_batch": launcher.per_rank_batch},
    }


def _launched(context: dg.AssetExecutionContext, launcher: LauncherConfig, pipes: dg.PipesSubprocessClient,
              stage: str, launch_spec: dict[str, Any], lock_dir: Path):
    out_dir = Path(launch_spec["out_dir"])
    spec_path = write_json(out_dir / "launch.json", launch_spec)
    log_path = out_dir / "torchrun.log"
    cmd = torchrun_command(launcher, stage, spec_path, context.run.run_id)
    gpus_wanted = launcher.nproc_per_node if launch_spec["device"]["device"] == "cuda" else 0
    with gpu_devices(lock_dir, gpus_wanted, wait_s=launcher.gpu_wait_s, log=context.log.info,
                     owner=f"run {context.run.run_id}") if gpus_wanted else contextlib.nullcontext([]) as gpus:
        env = {"PYTHONUNBUFFERED": "1"}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        context.log.info(f"launching {stage} on torchrun ({launcher.nnodes} node(s) × {launcher.nproc_per_node}"
                         + (f", GPUs {gpus}" if gpus else ", CPU") + f"): {' '.join(cmd)}")
        # torchrun's own failure summary (which rank died, how) goes to its stderr: keep a copy.
        wrapped = ["bash", "-c", 'set -o pipefail; "${@:2}" 2>&1 | tee -a "$1"', "torchrun", str(log_path), *cmd]
        try:
            invocation = pipes.run(context=context, command=wrapped, env=env, cwd=os.getcwd())
        except Exception as exc:
            time.sleep(0.2)
            output = log_path.read_text(errors="replace") if log_path.exists() else ""
            raise dg.Failure(
                description=f"{stage} on torchrun failed: {describe_torchrun_failure(output)}. The last good "
                            f"checkpoint is kept ({launch_spec['state_path'] or 'no state file'}); rematerialise to resume.",
                metadata={"torchrun_log": dg.MetadataValue.path(str(log_path)), "command": " ".join(cmd),
                          "launcher_error": str(exc)[:2000]},
            ) from None
    materializations = [r for r in invocation.get_results() if isinstance(r, dg.MaterializeResult)]
    if not materializations:
        raise dg.Failure(description=f"{stage} on torchrun ended without reporting a materialisation (see {log_path})")
    metadata = materializations[-1].metadata or {}
    summary = metadata["launch_result"]
    summary = summary.value if hasattr(summary, "value") else summary
    descriptor = metadata["descriptor"]
    artifact = load_descriptor(descriptor.value if hasattr(descriptor, "value") else descriptor)
    return artifact, summary


def _result(summary: dict[str, Any]) -> SimpleNamespace:
    """The fields of the step's result the asset reads, from what rank 0 reported."""
    return SimpleNamespace(**{**summary, "history": [dict(r) for r in summary["history"]]})


def _in_process_spec(spec: DeviceSpec, lock_dir: Path, context) -> contextlib.AbstractContextManager:
    """On a multi-GPU machine an in-process step takes one GPU of its own (``cuda`` → ``cuda:i``)."""
    import torch

    if not spec.is_cuda or spec.device.index is not None or torch.cuda.device_count() < 2:
        return contextlib.nullcontext(spec)

    @contextlib.contextmanager
    def pinned():
        with gpu_devices(lock_dir, 1, log=context.log.info, owner=f"run {context.run.run_id}") as (index,):
            yield DeviceSpec(torch.device("cuda", index), spec.amp_dtype)

    return pinned()


def _check_mode(launcher: LauncherConfig) -> None:
    if launcher.mode not in MODES:
        raise dg.Failure(description=f"launcher.mode must be one of {MODES}, got {launcher.mode!r}")


def run_prompts_step(context, launcher: LauncherConfig, pipes: dg.PipesSubprocessClient, manifest, frozen, config,
                     spec: DeviceSpec, out_dir: Path, *, cache_dir: Path, state_path: Path | None, log):
    """:func:`~reid_pipeline.pipeline.prompts_step` in process, or on torchrun/k8s; same return value."""
    _check_mode(launcher)
    lock_dir = cache_dir.parent / "_gpu_locks"
    if launcher.mode == "in_process":
        with _in_process_spec(spec, lock_dir, context) as pinned:
            return prompts_step(manifest, frozen, config, pinned, out_dir, cache_dir=cache_dir, state_path=state_path, log=log)
    launch_spec = _spec("stage1", {"dataset_manifest": manifest, "frozen_clip": frozen}, out_dir, cache_dir, state_path,
                        config.model_dump(mode="json"), spec, launcher)
    artifact, summary = _run_remote(context, launcher, pipes, "stage1", launch_spec, lock_dir)
    return artifact, _result(summary), {"image_to_prompt_accuracy": summary["image_to_prompt_accuracy"],
                                        "loss_curve": Path(summary["loss_curve"])}


def run_encoder_step(context, launcher: LauncherConfig, pipes: dg.PipesSubprocessClient, manifest, frozen, prompts,
                     config, spec: DeviceSpec, out_dir: Path, *, cache_dir: Path, state_path: Path | None, log):
    """:func:`~reid_pipeline.pipeline.encoder_step` in process, or on torchrun/k8s; same return value."""
    _check_mode(launcher)
    lock_dir = cache_dir.parent / "_gpu_locks"
    if launcher.mode == "in_process":
        with _in_process_spec(spec, lock_dir, context) as pinned:
            return encoder_step(manifest, frozen, prompts, config, pinned, out_dir, cache_dir=cache_dir,
                                state_path=state_path, log=log)
    launch_spec = _spec("stage2", {"dataset_manifest": manifest, "frozen_clip": frozen, "prompt_checkpoint": prompts},
                        out_dir, cache_dir, state_path, config.model_dump(mode="json"), spec, launcher)
    artifact, summary = _run_remote(context, launcher, pipes, "stage2", launch_spec, lock_dir)
    return artifact, _result(summary), {"loss_curves": Path(summary["loss_curves"])}


def _run_remote(context, launcher, pipes, stage, launch_spec, lock_dir):
    if launcher.mode == "torchrun":
        return _launched(context, launcher, pipes, stage, launch_spec, lock_dir)
    return _on_k8s(context, launcher, stage, launch_spec)


# ----------------------------------------------------------------------------------- Kubernetes


def k8s_base_pod_spec(launcher: LauncherConfig, storage_dir: Path, gpus: int) -> dict[str, Any]:
    """The pod spec (dagster-k8s ``base_pod_spec`` form) of one torchrun pod with ``gpus`` GPUs.

    The storage folder (descriptors, caches, checkpoints, artefacts) is the PersistentVolumeClaim
    ``k8s_storage_claim`` mounted at the same absolute path as in the Dagster step, so the launch
    spec's paths hold in the pod; ``/dev/shm`` is a memory-backed volume (NCCL and the data path
    need more than a container's default 64 MiB).
    """
    if not launcher.k8s_storage_claim:
        raise ValueError("launcher.k8s_storage_claim: the PersistentVolumeClaim holding the storage folder is required")
    resources: dict[str, Any] = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    container = {
        "name": "reid-train",
        "resources": resources,
        "volume_mounts": [{"name": "storage", "mount_path": str(storage_dir)},
                          {"name": "dshm", "mount_path": "/dev/shm"}],
    }
    if launcher.k8s_image:
        container["image"] = launcher.k8s_image
    return {
        "containers": [container],
        "restart_policy": "Never",
        "volumes": [{"name": "storage", "persistent_volume_claim": {"claim_name": launcher.k8s_storage_claim}},
                    {"name": "dshm", "empty_dir": {"medium": "Memory"}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}] if gpus else [],
    }


def k8s_command(launcher: LauncherConfig, stage: str, spec_path: Path) -> list[str]:
    """The pod's command: torchrun on one node with ``nproc_per_node`` workers (loopback rendezvous)."""
    return ["python", "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(launcher.nproc_per_node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400", "--local-addr", "127.0.0.1",
            "--max-restarts", str(launcher.max_restarts),
            "-m", "reid_pipeline.training.launch", stage, "--config", str(spec_path)]


def _on_k8s(context, launcher: LauncherConfig, stage: str, launch_spec: dict[str, Any]):
    from dagster_k8s import PipesK8sClient

    out_dir = Path(launch_spec["out_dir"])
    spec_path = write_json(out_dir / "launch.json", launch_spec)
    gpus = launcher.nproc_per_node if launch_spec["device"]["device"] == "cuda" else 0
    storage_dir = Path(launch_spec["cache_dir"]).parent
    try:
        invocation = PipesK8sClient().run(
            context=context, image=launcher.k8s_image or None, command=k8s_command(launcher, stage, spec_path),
            namespace=launcher.k8s_namespace, base_pod_spec=k8s_base_pod_spec(launcher, storage_dir, gpus),
        )
    except Exception as exc:
        raise dg.Failure(description=f"{stage} pod failed: {describe_torchrun_failure(str(exc))}") from None
    metadata = [r for r in invocation.get_results() if isinstance(r, dg.MaterializeResult)][-1].metadata
    summary = metadata["launch_result"].value
    return load_descriptor(metadata["descriptor"].value), json.loads(json.dumps(summary))
