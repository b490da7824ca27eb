"""The training assets with ``launcher: torchrun`` through Dagster Pipes, from the CLI; GPU allocation;
the Kubernetes pod spec built with dagster-k8s's own helpers."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env

DAGSTER = str(Path(sys.executable).with_name("dagster"))
TRAINING = ("prompt_checkpoint", "visual_encoder")
DATASET = "synthetic-ci"  # the partition the runs are for (one of the defaults), pointed at the test's own data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_torchrun_launch_materialises_with_in_process_metadata_keys(dagster_home, tmp_path, tiny_clip_path):
    """`dagster asset materialize … --partition synthetic-ci -c configs/ci.yaml -c <overlay>`: in process first, then with
    ``launcher: torchrun, nproc_per_node: 2`` — the same metadata keys, world size 2, a descriptor."""
    import dagster as dg

    from reid_pipeline.artifacts import load_descriptor
    from reid_pipeline.embedded.synthetic import generate_synthetic_dataset

    generate_synthetic_dataset(tmp_path / "data", num_ids=8, images_per_id=4, num_cameras=2, seed=1)
    base = yaml.safe_load((PROJECT_ROOT / "configs" / "ci.yaml").read_text())
    base["resources"]["reid"]["config"].update(datasets={DATASET: str(tmp_path / "data")}, clip_weights=str(tiny_clip_path),
                                               storage_dir=str(tmp_path / "artifacts"))
    base["ops"]["prompt_checkpoint"]["config"].update(epochs=2, batch_size=8)
    base["ops"]["visual_encoder"]["config"].update(epochs=2, ids_per_batch=2, instances_per_id=2,
                                                   max_iters_per_epoch=2, steps=[2])
    ci = _write(tmp_path / "ci.yaml", base)
    overlay = _write(tmp_path / "torchrun.yaml", {"ops": {
        name: {"config": {"launcher": {"mode": "torchrun", "nproc_per_node": 2, "num_threads": 1,
                                       "sync_bn": name == "visual_encoder"}}} for name in TRAINING}})

    def materialize(select: str, *configs: Path) -> str:
        args = [DAGSTER, "asset", "materialize", "-m", "reid_pipeline.definitions", "--select", select,
                "--partition", DATASET]
        for c in configs:
            args += ["-c", str(c)]
        env = {**cli_env(dagster_home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(args, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        return out

    materialize("dataset_manifest,frozen_clip,prompt_checkpoint,visual_encoder", ci)
    out = materialize("prompt_checkpoint,visual_encoder", ci, overlay)
    assert "launching stage1 on torchrun" in out and "stage 2 epoch 2/2" in out  # rank 0's log lines, via Pipes

    instance = dg.DagsterInstance.get()
    for name in TRAINING:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(name), asset_partitions=[DATASET]), limit=2).records
        torchrun, in_process = (r.asset_materialization.metadata for r in records)
        assert set(torchrun) == set(in_process), set(torchrun) ^ set(in_process)
        assert torchrun["world_size"].value == 2 and in_process["world_size"].value == 1
        assert "× 2 ranks (gloo)" in torchrun["device"].value
        assert torchrun["epochs"].value == 2 and torchrun["first_loss"].value > 0
        artifact = load_descriptor(torchrun["descriptor"].value)
        assert artifact.kind == name and (Path(artifact.artifact_dir) / "launch.json").is_file()
        assert Path(artifact.artifact_dir).parent == tmp_path / "artifacts" / name / DATASET  # the dataset's folder


def test_gpu_allocation_is_all_or_nothing_and_disjoint(tmp_path):
    from reid_pipeline.assets.launch import gpu_devices

    gpus = [0, 1, 2]
    with gpu_devices(tmp_path, 2, available=gpus) as first:
        assert len(first) == 2
        with gpu_devices(tmp_path, 1, available=gpus) as second:
            assert set(second).isdisjoint(first)
        with pytest.raises(TimeoutError, match="no 2 free GPUs"):
            with gpu_devices(tmp_path, 2, available=gpus, wait_s=0.3, poll_s=0.05):
                pass
        waited: list[list[int]] = []

        def later():
            with gpu_devices(tmp_path, 3, available=gpus, wait_s=10, poll_s=0.05) as got:
                waited.append(got)

        t = threading.Thread(target=later)
        t.start()
    t.join(10)
    assert waited == [[0, 1, 2]]  # once the first step let go, the waiting one got all three
    with gpu_devices(tmp_path, 2, available=[]) as none:
        assert none == []  # no GPU on this machine: nothing to pin
    with pytest.raises(ValueError, match="4 GPUs requested but this machine has 3"):
        with gpu_devices(tmp_path, 4, available=gpus):
            pass


def test_torchrun_command_and_failure_summary():
    from reid_pipeline.assets.launch import LauncherConfig, describe_torchrun_failure, torchrun_command

    cmd = torchrun_command(LauncherConfig(mode="torchrun", nproc_per_node=4), "stage2", Path("/s/launch.json"), "run-1")
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[-5:] == ["-m", "reid_pipeline.training.launch", "stage2",
                                                                        "--config", "/s/launch.json"]
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4" and cmd[cmd.index("--rdzv-id") + 1] == "run-1"
    assert cmd[cmd.index("--rdzv-endpoint") + 1].startswith("127.0.0.1:")
    with pytest.raises(ValueError, match="needs launcher.rdzv_endpoint"):
        torchrun_command(LauncherConfig(nnodes="2"), "stage1", Path("x"), "r")
    summary = """Failures:
[1]:
  time      : 2026-12-01_20:29:12
  host      : node-a
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 15568)
  error_file: /tmp/e.json
  traceback : Traceback (most recent call last):
    RuntimeError: [gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:47261: Connection reset by peer
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-01_20:29:11
  host      : node-b
  rank      : 3 (local_rank: 1)
  exitcode  : -9 (pid: 15569)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 15569
============================================================"""
    text = describe_torchrun_failure(summary)
    assert text.startswith("rank 3 (local rank 1) on node-b failed (killed by SIGKILL)"), text
    assert "then stopped: rank 0" in text
    assert "before a worker reported" in describe_torchrun_failure("bash: torchrun: command not found")


def test_k8s_pod_spec_with_dagster_k8s_helpers(tmp_path):
    """The training pod as PipesK8sClient builds it: N GPUs, the shared storage volume at the same
    path, a memory-backed /dev/shm, the Pipes environment, torchrun with N workers."""
    from dagster_k8s.pipes import build_pod_body

    from reid_pipeline.assets.launch import LauncherConfig, k8s_base_pod_spec, k8s_command

    launcher = LauncherConfig(mode="k8s", nproc_per_node=4, k8s_image="registry.local/reid:1", k8s_storage_claim="reid-data")
    storage = tmp_path / "artifacts"
    pod = build_pod_body("reid-train-abc", launcher.k8s_image, k8s_command(launcher, "stage2", storage / "x/launch.json"),
                         {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}, None,
                         k8s_base_pod_spec(launcher, storage, gpus=4))
    container = pod.spec.containers[0]
    assert container.image == "registry.local/reid:1"
    assert container.resources.limits == {"nvidia.com/gpu": "4"}
    assert {e.name: e.value for e in container.env} == {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    mounts = {m.name: m.mount_path for m in container.volume_mounts}
    assert mounts == {"storage": str(storage), "dshm": "/dev/shm"}
    volumes = {v.name: v for v in pod.spec.volumes}
    assert volumes["storage"].persistent_volume_claim.claim_name == "reid-data"
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert pod.spec.restart_policy == "Never" and pod.spec.tolerations[0].key == "nvidia.com/gpu"
    cmd = container.command
    assert cmd[cmd.index("--nproc-per-node") + 1] == "4"
    assert cmd[-5:] == ["-m", "reid_pipeline.training.launch", "stage2", "--config", str(storage / "x/launch.json")]
    with pytest.raises(ValueError, match="k8s_storage_claim"):
        k8s_base_pod_spec(LauncherConfig(mode="k8s"), storage, gpus=1)
