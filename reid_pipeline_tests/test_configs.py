"""Every run-config preset under configs/ is valid for the asset graph, and the paper presets say what the paper says."""

from __future__ import annotations

import pytest
import yaml

import dagster as dg

from reid_pipeline.assets.stage1 import PromptCheckpointConfig
from reid_pipeline.assets.stage2 import VisualEncoderConfig
from reid_pipeline_tests.conftest import PROJECT_ROOT

PRESETS = sorted((PROJECT_ROOT / "configs").glob("*.yaml"))


def test_expected_presets_exist():
    names = {p.stem for p in PRESETS}
    assert {"demo", "ci", "market1501_vitb16", "market1501_rn50", "msmt17_vitb16", "dukemtmc_vitb16"} <= names


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_against_the_graph(preset, monkeypatch):
    from reid_pipeline.definitions import defs

    monkeypatch.setenv("REID_DATA_ROOT", "/data/somewhere")
    job = defs.get_implicit_global_asset_job_def()
    result = dg.validate_run_config(job, yaml.safe_load(preset.read_text()))
    assert result["ops"]["dataset_manifest"]["config"]["layout"]


@pytest.mark.parametrize("arch,epochs", [("vit", 120), ("resnet", 60)])
def test_stage1_paper_numbers(arch, epochs):
    cfg = PromptCheckpointConfig().library_config(arch)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == (epochs, 64, 3.5e-4, 1e-4, 5)
    assert (cfg.warmup_lr_init, cfg.min_lr, cfg.n_ctx) == (1e-5, 1e-6, 4)


def test_stage2_paper_numbers():
    vit = VisualEncoderConfig().library_config("vit", None, (256, 128))
    assert (vit.max_epochs, vit.base_lr, vit.weight_decay, list(vit.steps), vit.warmup_factor) == (60, 5e-6, 1e-4, [30, 50], 0.1)
    assert (vit.id_loss_weight, vit.triplet_loss_weight, vit.i2t_loss_weight) == (0.25, 1.0, 1.0)
    assert (vit.ids_per_batch, vit.instances_per_id, vit.bias_lr_factor, vit.warmup_epochs) == (16, 4, 2.0, 10)
    rn = VisualEncoderConfig().library_config("resnet", None, (256, 128))
    assert (rn.max_epochs, rn.base_lr, rn.weight_decay, list(rn.steps), rn.warmup_factor) == (120, 3.5e-4, 5e-4, [40, 70], 0.01)
    assert (rn.id_loss_weight, rn.triplet_loss_weight, rn.i2t_loss_weight) == (1.0, 1.0, 1.0)
    olp = VisualEncoderConfig(sie_camera=True).library_config("vit", 12, (256, 128))
    assert olp.stride == 12 and olp.sie_camera and olp.sie_coe == 3.0


def test_stage2_refuses_prompts_of_other_identities():
    from reid_pipeline.assets.stage2 import check_stage1_identities
    from reid_pipeline.training.stage2 import Stage1MismatchError

    manifest = {"label_to_pid": [2, 5, 7], "fingerprint": "abc"}
    same = {"label_to_pid": [2, 5, 7], "manifest_fingerprint": "abc", "tokens": "/x/prompt_tokens.safetensors"}
    check_stage1_identities(same, manifest)
    other = {"label_to_pid": [2, 5, 9], "manifest_fingerprint": "old", "tokens": "/x/prompt_tokens.safetensors"}
    with pytest.raises(Stage1MismatchError, match=r"prompt_tokens.safetensors.*new pids \[7\], gone \[9\].*rematerialise prompt_checkpoint"):
        check_stage1_identities(other, manifest)
