"""Run-config presets: each is valid for the asset graph, a paper overlay on top of configs/paper.yaml
resolves to the paper's numbers through the asset configs (None = the library default = the paper),
and presets merge the way the Dagster CLI merges repeated ``-c`` files."""

from __future__ import annotations

import pytest
import yaml
from dagster_shared.yaml_utils import merge_yamls

import dagster as dg

from reid_pipeline.artifacts import ClipRef, FrozenClipArtifact, ManifestArtifact, PromptArtifact
from reid_pipeline.assets.training import PromptCheckpointConfig, VisualEncoderConfig
from reid_pipeline.retrain import load_run_config, load_run_preset, merge_run_configs
from reid_pipeline_tests.conftest import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"
BASE = CONFIGS / "paper.yaml"
#: overlay → (layout, CLIP weights, architecture)
PAPER_OVERLAYS = {
    "market1501_vitb16": ("market1501", "ViT-B/16", "vit"),
    "dukemtmc_vitb16": ("dukemtmc", "ViT-B/16", "vit"),
    "msmt17_vitb16": ("msmt17", "ViT-B/16", "vit"),
    "market1501_rn50": ("market1501", "RN50", "resnet"),
}
STANDALONE = ["demo", "ci"]


def _job():
    from reid_pipeline.definitions import defs

    return defs.resolve_implicit_global_asset_job_def()


def _frozen(arch: str, stride=None) -> FrozenClipArtifact:
    ref = ClipRef(source="ViT-B/16", name="ViT-B/16", sha256="0" * 64, arch=arch, input_size=(256, 128), stride=stride,
                  version="v")
    return FrozenClipArtifact(artifact_dir="/x", clip=ref)


def test_expected_presets_exist():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {"paper", *PAPER_OVERLAYS, *STANDALONE} <= names


@pytest.mark.parametrize("name", STANDALONE)
def test_standalone_preset_validates_against_the_graph(name):
    result = dg.validate_run_config(_job(), yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    assert result["ops"]["visual_encoder"]["config"]["epochs"] >= 1


@pytest.mark.parametrize("name", ["demo", "ci"])
def test_small_presets_run_in_one_process(name):
    """The demo and CI presets ask Dagster's default executor for one process (11 fresh Pythons cost ~100 s
    on 2 cores); the paper presets keep a process per step."""
    small = dg.validate_run_config(_job(), yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()))
    assert list(small["execution"]["multi_or_in_process_executor"]) == ["in_process"]
    assert "execution" not in load_run_config([BASE, CONFIGS / "market1501_vitb16.yaml"])


def test_merge_is_the_cli_merge():
    """Our merge (used for REID_RUN_CONFIG) equals Dagster's own merge of repeated -c files."""
    for overlay in PAPER_OVERLAYS:
        files = [str(BASE), str(CONFIGS / f"{overlay}.yaml")]
        assert load_run_config(",".join(files)) == merge_yamls(files)
    assert merge_run_configs({"a": {"b": 1, "c": [1]}}, {"a": {"c": [2], "d": 3}}) == {"a": {"b": 1, "c": [2], "d": 3}}


@pytest.mark.parametrize("overlay", sorted(PAPER_OVERLAYS))
def test_paper_preset_resolves_to_the_paper(overlay, monkeypatch):
    layout, weights, arch = PAPER_OVERLAYS[overlay]
    config = load_run_config([BASE, CONFIGS / f"{overlay}.yaml"])
    result = dg.validate_run_config(_job(), config)
    assert result["ops"]["dataset_manifest"]["config"]["layout"] == layout
    assert result["resources"]["reid"]["config"]["clip_weights"] == weights
    assert result["resources"]["device"]["config"]["precision"] == "auto"  # fp16 + grad scaler on a GPU
    assert result["ops"]["reid_features"]["config"]["precision"] == "fp32"  # test features in fp32
    ops = config["ops"]
    s1 = PromptCheckpointConfig(**ops.get("prompt_checkpoint", {}).get("config", {})).library_config(arch)
    assert (s1.epochs, s1.batch_size, s1.lr, s1.weight_decay, s1.warmup_epochs) == (
        {"vit": 120, "resnet": 60}[arch], 64, 3.5e-4, 1e-4, 5)
    assert (s1.warmup_lr_init, s1.min_lr, s1.n_ctx) == (1e-5, 1e-6, 4)
    s2 = VisualEncoderConfig(**ops.get("visual_encoder", {}).get("config", {})).library_config(_frozen(arch))
    if arch == "vit":
        assert (s2.epochs, s2.lr, s2.weight_decay, list(s2.steps), s2.warmup_factor) == (60, 5e-6, 1e-4, [30, 50], 0.1)
        assert (s2.id_loss_weight, s2.triplet_loss_weight, s2.i2t_loss_weight) == (0.25, 1.0, 1.0)
    else:
        assert (s2.epochs, s2.lr, s2.weight_decay, list(s2.steps), s2.warmup_factor) == (120, 3.5e-4, 5e-4, [40, 70], 0.01)
        assert (s2.id_loss_weight, s2.triplet_loss_weight, s2.i2t_loss_weight) == (1.0, 1.0, 1.0)
    assert (s2.ids_per_batch, s2.instances_per_id, s2.bias_lr_factor, s2.warmup_epochs) == (16, 4, 2.0, 10)
    assert s2.input_size == (256, 128) and not s2.sie_camera
    evaluation = ops["evaluation_metrics"]["config"]
    assert evaluation["rerank"] is True


def test_sie_olp_option_uses_the_published_coefficient():
    """The commented SIE+OLP blocks of the ViT overlays, uncommented, give stride 12 and SIE coefficient 1.0."""
    text = (CONFIGS / "market1501_vitb16.yaml").read_text()
    block = "\n".join(line.replace("  # ", "  ", 1) if line.startswith("  # ") and ":" in line and "MODEL." not in line
                      and "README" not in line and "SIE + OLP" not in line else line for line in text.splitlines())
    ops = yaml.safe_load(block)["ops"]
    assert ops["frozen_clip"]["config"]["stride"] == 12
    s2 = VisualEncoderConfig(**ops["visual_encoder"]["config"]).library_config(_frozen("vit", stride=12))
    assert s2.sie_camera and s2.sie_coe == 1.0 and s2.stride == 12


def test_unset_overrides_are_the_library_defaults():
    assert PromptCheckpointConfig().overrides() == {} and VisualEncoderConfig().overrides() == {}
    assert VisualEncoderConfig(lr=1e-4).overrides() == {"lr": 1e-4}
    assert VisualEncoderConfig().library_config(_frozen("vit")).sie_coe == 3.0  # CLIP-ReID's config default


def test_random_erasing_is_an_asset_option_checked_by_the_library():
    assert VisualEncoderConfig().library_config(_frozen("vit")).erase_p == 0.5  # the paper's
    assert VisualEncoderConfig(erase_p=0.0).library_config(_frozen("vit")).erase_p == 0.0
    with pytest.raises(ValueError, match="erase_p"):
        VisualEncoderConfig(erase_p=1.5).library_config(_frozen("vit"))


def test_run_preset_loader_names_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_run_preset(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="bad.yaml.*expected a mapping"):
        load_run_preset(str(bad))


def test_stage2_refuses_prompts_of_other_identities():
    from reid_pipeline.pipeline import check_stage1_identities
    from reid_pipeline.training.stage2 import Stage1MismatchError

    ref = _frozen("vit").clip
    manifest = ManifestArtifact(artifact_dir="/m", manifest="/m/manifest.parquet", root="/d", layout="market1501",
                                fingerprint="abc", num_classes=3, label_to_pid=[2, 5, 7], num_cameras=2)
    same = PromptArtifact(artifact_dir="/x", tokens="/x/prompt_tokens.safetensors", num_classes=3, label_to_pid=[2, 5, 7],
                          template="A photo of a X X X X person.", n_ctx=4, clip=ref, manifest_fingerprint="abc",
                          precision="fp32")
    check_stage1_identities(same, manifest)
    other = same.model_copy(update={"label_to_pid": [2, 5, 9], "manifest_fingerprint": "old"})
    expected = r"prompt_tokens.safetensors.*new pids \[7\], gone \[9\].*rematerialise prompt_checkpoint"
    with pytest.raises(Stage1MismatchError, match=expected):
        check_stage1_identities(other, manifest)
