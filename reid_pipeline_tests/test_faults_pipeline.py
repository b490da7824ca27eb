"""The real pipeline under faults, through the CLI users run.

``kill -9`` of the whole ``dagster asset materialize`` process tree in the middle of stage 2, then the
same command again, unattended: the dead run is reaped (its ``gpu`` slot freed), stage 2 resumes from
its last checkpoint and ends with exactly the weights of an uninterrupted run (CPU, one thread).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from reid_pipeline.storage import load_tensors
from reid_pipeline_tests.conftest import PROJECT_ROOT, cli_env

pytestmark = [pytest.mark.faults, pytest.mark.slow]
DAGSTER = str(Path(sys.executable).with_name("dagster"))
UPSTREAM = "raw_dataset,clip_weights,dataset_manifest,frozen_clip,prompt_checkpoint"
DATASET = "synthetic-ci"  # the partition the runs are for (one of the defaults), pointed at the test's own data


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    from reid_pipeline.embedded.synthetic import generate_synthetic_dataset
    from reid_pipeline.embedded.tiny_clip import ensure_tiny_clip

    root = tmp_path_factory.mktemp("inputs")
    generate_synthetic_dataset(root / "data", num_ids=12, images_per_id=6, seed=3)
    return root / "data", ensure_tiny_clip(root / "clip.pt", arch="vit", seed=0)


def _preset(tmp_path: Path, data: Path, weights: Path, epochs: int) -> Path:
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "ci.yaml").read_text())
    config["resources"]["reid"]["config"].update(datasets={DATASET: str(data)}, clip_weights=str(weights),
                                                 storage_dir=str(tmp_path / "artifacts"))
    config["ops"]["prompt_checkpoint"]["config"]["epochs"] = 2
    config["ops"]["visual_encoder"]["config"].update(epochs=epochs, steps=[epochs], ids_per_batch=4)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _materialize(home: Path, preset: Path, select: str, **popen) -> subprocess.Popen:
    env = cli_env(home)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # bit-identical CPU runs
    return subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "reid_pipeline.definitions", "--select", select,
                             "--partition", DATASET, "-c", str(preset)], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def _ok(proc: subprocess.Popen, timeout: float = 900) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-5000:]
    return out


def _encoder_metadata(home: Path) -> dict:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("visual_encoder"), asset_partitions=[DATASET]), limit=1).records
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def test_kill_9_in_stage_2_then_unattended_resume_is_bit_identical(tmp_path, dagster_home, small_inputs):
    data, weights = small_inputs
    preset = _preset(tmp_path, data, weights, epochs=5)
    _ok(_materialize(dagster_home, preset, UPSTREAM))
    _ok(_materialize(dagster_home, preset, "visual_encoder"))
    reference = _encoder_metadata(dagster_home)
    assert reference["resumed_from_epoch"] == 0 and reference["epochs"] == 5

    victim = _materialize(dagster_home, preset, "visual_encoder", start_new_session=True)
    resume = tmp_path / "artifacts" / "visual_encoder" / DATASET / "_resume"  # storage/<asset>/<dataset>/_resume
    deadline = time.time() + 600
    while True:  # kill the whole tree once stage 2 has checkpointed epoch 2
        sidecars = list(resume.glob("*/state.json"))
        if sidecars and json.loads(sidecars[0].read_text() or "{}").get("epoch", 0) >= 2:
            break
        assert victim.poll() is None, victim.communicate()[0][-4000:]
        assert time.time() < deadline, "stage 2 did not checkpoint epoch 2 in time"
        time.sleep(0.1)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        stuck = [r for r in instance.get_runs() if r.status == dg.DagsterRunStatus.STARTED]
        assert len(stuck) == 1 and instance.event_log_storage.get_concurrency_info("gpu").claimed_slots

    out = _ok(_materialize(dagster_home, preset, "visual_encoder"), timeout=600)  # the same command, nothing else
    assert "marked failed by reid_pipeline" in out
    resumed = _encoder_metadata(dagster_home)
    assert resumed["resumed_from_epoch"] >= 2 and resumed["epochs"] == 5
    assert tmp_path / "artifacts" / "visual_encoder" / DATASET in Path(resumed["weights"]).parents  # the dataset's folder
    a, _ = load_tensors(reference["weights"])
    b, _ = load_tensors(resumed["weights"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert not list(resume.glob("*/state.*"))  # finished: no resumable state left behind
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [r.status.value for r in instance.get_runs()].count("FAILURE") == 1


def test_diverging_stage_1_fails_its_check(tmp_path, small_inputs):
    """lr 1e6: the loss ends above where it started without ever being NaN; the asset still succeeds
    (its prompts are saved), but the `loss_decreased` check fails and the log says why."""
    from reid_pipeline.assets.backbone import frozen_clip
    from reid_pipeline.assets.data import dataset_manifest
    from reid_pipeline.assets.training import prompt_checkpoint
    from reid_pipeline.resources import ArtifactIOManager, ReidSettings, TrainingDevice

    data, weights = small_inputs
    resources = {"reid": ReidSettings(datasets={DATASET: str(data)}, clip_weights=str(weights),
                                      storage_dir=str(tmp_path / "a")),
                 "device": TrainingDevice(device="cpu"), "io_manager": ArtifactIOManager(),
                 "pipes_subprocess_client": dg.PipesSubprocessClient()}
    run_config = {"ops": {"frozen_clip": {"config": {"input_height": 64, "input_width": 32}},
                          "prompt_checkpoint": {"config": {"epochs": 4, "lr": 1e6, "warmup_epochs": 0}}}}
    with dg.instance_for_test() as instance:
        result = dg.materialize([dataset_manifest, frozen_clip, prompt_checkpoint], instance=instance,
                                resources=resources, run_config=run_config, raise_on_error=False, partition_key=DATASET)
        logs = [e.message for e in instance.all_logs(result.run_id) if e.message]
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "loss_decreased"]
    first, last = check.metadata["first_epoch_loss"].value, check.metadata["last_epoch_loss"].value
    assert not check.passed and last >= first, (first, last)
    assert any("training diverged" in m for m in logs)
