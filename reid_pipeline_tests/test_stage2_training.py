"""Stage-2 model, optimiser, schedule and training loop on the embedded tiny CLIP (CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform
from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.tiny_clip import ensure_tiny_clip
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.model.reid_model import ReIDModel, load_reid_model, save_reid_model
from reid_pipeline.storage import CheckpointError, sidecar_path
from reid_pipeline.training.extract import extract_features
from reid_pipeline.evaluation.plots import plot_training_history
from reid_pipeline.training.loop import COMMON_FIELDS
from reid_pipeline.training.schedulers import set_lr
from reid_pipeline.training.stage2 import (
    NonFiniteLossError,
    Stage1MismatchError,
    Stage2Config,
    build_optimizer,
    build_reid_model,
    stage2_lr,
    train_visual_encoder,
)

SIZE = (64, 32)  # small input keeps the CPU tests fast; the code path is the 256×128 one
CPU = resolve_device("cpu")


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {arch: ensure_tiny_clip(d / f"tiny-{arch}.pt", arch) for arch in ("vit", "resnet")}


@pytest.fixture(scope="module")
def vit_clip(clip_files):
    model, info = load_clip(clip_files["vit"], input_size=SIZE)
    return model


@pytest.fixture(scope="module")
def data():
    """8 identities × 5 images (two cameras), small uint8 images with an identity-specific colour."""
    g = torch.Generator().manual_seed(0)
    imgs, labels, cams = [], [], []
    for pid in range(8):
        colour = torch.randint(0, 256, (3, 1, 1), generator=g)
        for j in range(5):
            noise = torch.randint(-40, 41, (3, 32, 16), generator=g)
            imgs.append((colour + noise).clamp(0, 255).to(torch.uint8))
            labels.append(pid)
            cams.append(j % 2)
    return ImageCache.from_tensors(imgs), torch.tensor(labels), torch.tensor(cams)


def tiny_config(**kw) -> Stage2Config:
    base = dict(input_size=SIZE, epochs=3, ids_per_batch=4, instances_per_id=2, max_iters_per_epoch=2,
                lr=1e-4, warmup_epochs=1, steps=[2], log_period=1000)
    base.update(kw)
    return Stage2Config.paper("vit", **base)


def stop_at(epoch: int):
    """An on_epoch_end callback that stops the run after ``epoch`` (a planned interruption)."""
    return lambda row: row["epoch"] >= epoch


def text_features(n: int = 8, dim: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, dim, generator=g)
    return t / t.norm(dim=1, keepdim=True)


# ------------------------------------------------------------------ model


def test_reid_model_vit_shapes_and_heads(vit_clip):
    m = ReIDModel(vit_clip, 8)
    assert (m.arch, m.mid_dim, m.feat_dim, m.proj_dim, m.test_dim) == ("vit", 256, 256, 128, 384)
    x = torch.randn(6, 3, *SIZE)
    logits, feats, proj = m.train()(x)
    assert [tuple(t.shape) for t in logits] == [(6, 8), (6, 8)]
    assert [tuple(t.shape) for t in feats] == [(6, 256), (6, 256), (6, 128)]
    assert proj is feats[2]
    assert m.eval()(x).shape == (6, 384)
    # BNNeck: weight 1, bias 0 and frozen; classifiers bias-free, N(0, 0.001)
    for bn in (m.bottleneck, m.bottleneck_proj):
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and not bn.bias.requires_grad
    assert m.classifier.bias is None and m.classifier_proj.bias is None
    assert 0.0005 < m.classifier.weight.std().item() < 0.002
    # the visual encoder is a trainable copy; the CLIP passed in stays frozen and untouched
    assert all(p.requires_grad for p in m.visual.parameters())
    assert not any(p.requires_grad for p in vit_clip.parameters())
    assert m.visual is not vit_clip.visual


def test_reid_model_vit_sie_and_overlapping_patches(clip_files):
    olp_clip, info = load_clip(clip_files["vit"], input_size=SIZE, stride=12)
    assert info.stride == 12
    m = ReIDModel(olp_clip, 8, num_cameras=3, sie_coe=1.5)
    assert m.stride == 12 and m.cv_embed.shape == (3, 256) and m.describe()["grid_hw"] == [5, 2]
    x = torch.randn(4, 3, *SIZE)
    cams = torch.tensor([0, 1, 2, 0])
    logits, feats, _ = m.train()(x, cams)
    assert logits[0].shape == (4, 8) and feats[1].shape == (4, 256)
    m.eval()
    with torch.no_grad():
        a = m(x, cams)
        b = m(x, torch.tensor([1, 1, 2, 0]))
    assert a.shape == (4, 384)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])  # camera changes only its sample
    with pytest.raises(ValueError, match="cam_ids"):
        m(x)


def test_reid_model_resnet_shapes(clip_files):
    rn_clip, info = load_clip(clip_files["resnet"], input_size=SIZE)
    m = ReIDModel(rn_clip, 5)
    # tiny RN: width 16 → layer3 16·16, layer4 16·32, attention-pool token = embed 128 (RN50: 1024/2048/1024)
    assert (m.arch, m.mid_dim, m.feat_dim, m.proj_dim) == ("resnet", 256, 512, 128)
    x = torch.randn(4, 3, *SIZE)
    logits, feats, proj = m.train()(x)
    assert [tuple(t.shape) for t in feats] == [(4, 256), (4, 512), (4, 128)]
    assert m.eval()(x).shape == (4, 640)
    with pytest.raises(ValueError, match="ViT backbones only"):
        ReIDModel(rn_clip, 5, num_cameras=2)


def test_frozen_baseline_is_clip_encoder_and_checkpoint_roundtrip(vit_clip, tmp_path):
    base = ReIDModel.frozen_baseline(vit_clip)
    x = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        f = base(x)
        assert torch.allclose(f[:, base.feat_dim :], vit_clip.encode_image(x), atol=1e-6)
    m = ReIDModel(vit_clip, 8, seed=5)
    with torch.no_grad():
        m.visual.proj.add_(0.01)
    path = save_reid_model(tmp_path / "enc.safetensors", m, {"label_to_pid": {"0": 17}})
    loaded, meta = load_reid_model(path, vit_clip)
    assert meta["label_to_pid"] == {"0": 17} and meta["model"]["feature_dims"]["test"] == 384
    with torch.no_grad():
        assert torch.equal(loaded(x), m.eval()(x))
    other = ReIDModel(vit_clip, 9)
    with pytest.raises(CheckpointError, match="shape"):
        other.load_state_tensors(m.state_tensors())


# ------------------------------------------------------------------ config, optimiser, schedule


def test_paper_presets():
    v = Stage2Config.paper("vit")
    assert (v.lr, v.weight_decay, v.weight_decay_bias, v.epochs, v.steps, v.gamma) == (5e-6, 1e-4, 1e-4, 60, [30, 50], 0.1)
    assert (v.warmup_epochs, v.warmup_factor, v.bias_lr_factor, v.batch_size) == (10, 0.1, 2.0, 64)
    assert (v.id_loss_weight, v.triplet_loss_weight, v.i2t_loss_weight) == (0.25, 1.0, 1.0)
    assert v.pixel_mean == (0.5, 0.5, 0.5) and v.input_size == (256, 128) and v.padding == 10
    # the paper's 10-pixel padding is for 256-pixel-high inputs: a smaller input gets the same share
    assert Stage2Config.paper("vit", input_size=(128, 64)).padding == 5
    assert Stage2Config.paper("vit", input_size=(128, 64), padding=10).padding == 10
    r = Stage2Config.paper("resnet")
    assert (r.lr, r.weight_decay, r.epochs, r.steps, r.warmup_factor) == (3.5e-4, 5e-4, 120, [40, 70], 0.01)
    assert (r.id_loss_weight, r.triplet_loss_weight, r.i2t_loss_weight) == (1.0, 1.0, 1.0)
    assert r.pixel_mean == (0.485, 0.456, 0.406) and r.pixel_std == (0.229, 0.224, 0.225)
    assert Stage2Config.paper("vit", sie_camera=True, stride=12).stride == 12
    with pytest.raises(ValueError, match="ViT backbones only"):
        Stage2Config.paper("resnet", sie_camera=True)
    with pytest.raises(ValueError):
        Stage2Config.paper("vit", unknown_knob=1)


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("vit", {1: 5e-6 * 0.19, 10: 5e-6, 11: 5e-6, 30: 5e-7, 31: 5e-7, 50: 5e-8, 51: 5e-8}),
        ("resnet", {1: 3.5e-4 * 0.109, 10: 3.5e-4, 11: 3.5e-4, 40: 3.5e-5, 41: 3.5e-5, 70: 3.5e-6, 71: 3.5e-6}),
    ],
)
def test_learning_rate_schedule_at_key_epochs(vit_clip, arch, expected):
    cfg = Stage2Config.paper(arch)
    opt = build_optimizer(ReIDModel(vit_clip, 4), cfg)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["weights", "biases"]
    for epoch, lr in expected.items():
        assert stage2_lr(epoch, cfg) == pytest.approx(lr, rel=1e-9)
        set_lr(opt, stage2_lr(epoch, cfg))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-9)
        assert opt.param_groups[1]["lr"] == pytest.approx(2 * lr, rel=1e-9)  # bias lr ×2
    assert opt.param_groups[0]["weight_decay"] == cfg.weight_decay
    assert opt.param_groups[1]["weight_decay"] == cfg.weight_decay_bias


def test_optimizer_groups_cover_trainable_params_only(vit_clip):
    m = ReIDModel(vit_clip, 4, num_cameras=2)
    opt = build_optimizer(m, Stage2Config.paper("vit", sie_camera=True))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(m.named_parameters())
    assert id(named["bottleneck.bias"]) not in in_opt  # frozen BNNeck bias
    assert id(named["cv_embed"]) in in_opt and id(named["visual.conv1.weight"]) in in_opt
    biases = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(named["visual.transformer.resblocks.0.attn.in_proj_bias"]) in biases
    assert len(in_opt) == sum(1 for p in m.parameters() if p.requires_grad)


# ------------------------------------------------------------------ training loop


def test_training_changes_image_encoder_only(vit_clip, data):
    cache, labels, cams = data
    clip_before = {k: v.clone() for k, v in vit_clip.state_dict().items()}
    tf = text_features()
    tf_before = tf.clone()
    cfg = tiny_config(epochs=2)
    model = build_reid_model(vit_clip, 8, cfg)
    visual_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    lines: list[str] = []
    result = train_visual_encoder(model, tf, cache, labels, cams, cfg, CPU, log=lines.append)
    assert result.completed and result.epochs_completed == 2 and len(result.history) == 2
    for key in ("loss", "id", "triplet", "i2t", "acc", "id_acc", *COMMON_FIELDS):
        assert key in result.history[0]
    assert result.samples_per_s > 0 and result.wall_time_s > 0 and 0 <= result.final_accuracy <= 1
    assert result.precision == "fp32"
    epoch_lines = [ln for ln in lines if ln.startswith("stage 2 epoch 2/2")]
    assert epoch_lines and all(w in epoch_lines[0] for w in ("loss", "id", "triplet", "i2t", "acc", "lr", "samples/s", "ETA"))
    # text side (CLIP incl. its text encoder, and the stage-1 text features) bit-identical ...
    for k, v in vit_clip.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
    assert torch.equal(tf, tf_before)
    # ... while the image encoder moved
    changed = [k for k, v in model.visual.state_dict().items() if not torch.equal(v, visual_before[k])]
    assert "conv1.weight" in changed and "proj" in changed


def test_resume_equals_uninterrupted(vit_clip, data, tmp_path):
    cache, labels, cams = data
    tf = text_features()
    cfg = tiny_config(epochs=3, sie_camera=True)

    full = build_reid_model(vit_clip, 8, cfg, num_cameras=2)
    r_full = train_visual_encoder(full, tf, cache, labels, cams, cfg, CPU, state_path=tmp_path / "a.safetensors")

    state = tmp_path / "b.safetensors"
    first = build_reid_model(vit_clip, 8, cfg, num_cameras=2)
    r1 = train_visual_encoder(first, tf, cache, labels, cams, cfg, CPU, state_path=state, on_epoch_end=stop_at(1))
    assert not r1.completed and r1.epochs_completed == 1 and state.is_file()
    resumed = build_reid_model(vit_clip, 8, cfg.model_copy(update={"log_period": 1}), num_cameras=2)
    lines: list[str] = []
    r2 = train_visual_encoder(resumed, tf, cache, labels, cams, cfg, CPU, state_path=state, log=lines.append)
    assert r2.resumed_from_epoch == 1 and r2.completed and any("resuming" in ln for ln in lines)

    a, b = full.state_tensors(), resumed.state_tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "samples_per_s", "eta_s")} for e in h]  # noqa: E731
    assert strip(r_full.history) == strip(r2.history)

    # a finished state: nothing left to do
    r3 = train_visual_encoder(resumed, tf, cache, labels, cams, cfg, CPU, state_path=state)
    assert r3.completed and r3.iterations == 0
    # a different configuration refuses the state
    with pytest.raises(CheckpointError, match="different stage 2 run.*config.lr: saved 0.0001 vs now 0.001"):
        train_visual_encoder(resumed, tf, cache, labels, cams, cfg.model_copy(update={"lr": 1e-3}), CPU, state_path=state)


def test_torn_checkpoint_is_detected_not_resumed(vit_clip, data, tmp_path):
    """Tensors from one save and the sidecar from another (a crash between the two writes, or files
    copied from different epochs): the loop refuses to resume instead of ending with other weights."""
    cache, labels, cams = data
    cfg = tiny_config(epochs=3)
    state = tmp_path / "s.safetensors"
    train_visual_encoder(build_reid_model(vit_clip, 8, cfg), text_features(), cache, labels, None, cfg, CPU,
                         state_path=state, on_epoch_end=stop_at(1))
    epoch1_tensors = state.read_bytes()
    train_visual_encoder(build_reid_model(vit_clip, 8, cfg), text_features(), cache, labels, None, cfg, CPU,
                         state_path=state, on_epoch_end=stop_at(2))
    state.write_bytes(epoch1_tensors)  # sidecar still from epoch 2
    with pytest.raises(CheckpointError, match=r"torn checkpoint \(tensors from epoch 1, sidecar s.json from epoch 2"):
        train_visual_encoder(build_reid_model(vit_clip, 8, cfg), text_features(), cache, labels, None, cfg, CPU,
                             state_path=state)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(vit_clip, data, tmp_path):
    cache, labels, cams = data
    cfg = tiny_config(epochs=3)
    state = tmp_path / "s.safetensors"
    train_visual_encoder(build_reid_model(vit_clip, 8, cfg), text_features(), cache, labels, None, cfg, CPU,
                         state_path=state, on_epoch_end=stop_at(1))
    before = (state.read_bytes(), sidecar_path(state).read_bytes())
    bad = text_features()
    bad[3, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 1") as info:
        train_visual_encoder(build_reid_model(vit_clip, 8, cfg), bad, cache, labels, None, cfg, CPU, state_path=state)
    assert info.value.epoch == 2 and info.value.step == 1 and info.value.checkpoint == str(state)
    assert "last good checkpoint" in str(info.value)
    assert (state.read_bytes(), sidecar_path(state).read_bytes()) == before


def test_stage1_mismatch_and_bad_inputs_are_clear(vit_clip, data):
    cache, labels, cams = data
    cfg = tiny_config(epochs=1)
    model = build_reid_model(vit_clip, 8, cfg)
    with pytest.raises(Stage1MismatchError, match="stage 1 must be rematerialised"):
        train_visual_encoder(model, text_features(n=9), cache, labels, None, cfg, CPU)
    with pytest.raises(Stage1MismatchError, match="64-d .* 128-d"):
        train_visual_encoder(model, text_features(dim=64), cache, labels, None, cfg, CPU)
    with pytest.raises(ValueError, match="contiguous"):
        train_visual_encoder(model, text_features(), cache, labels * 2, None, cfg, CPU)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        train_visual_encoder(model, text_features(), cache, labels[:3], None, cfg, CPU)
    with pytest.raises(ValueError, match="input size"):
        train_visual_encoder(model, text_features(), cache, labels, None, tiny_config(input_size=(256, 128)), CPU)
    sie = build_reid_model(vit_clip, 8, tiny_config(sie_camera=True), num_cameras=2)
    with pytest.raises(ValueError, match=r"camids must be in \[0, 2\)"):
        train_visual_encoder(sie, text_features(), cache, labels, cams + 1, tiny_config(sie_camera=True), CPU)


def test_extract_features_and_history_plot(vit_clip, data, tmp_path):
    cache, labels, cams = data
    model = ReIDModel(vit_clip, 8).train()
    tt = TestTransform(SIZE)
    idx = [5, 0, 39, 12, 7]
    feats = extract_features(model, cache, idx, tt, CPU, batch_size=2)
    assert feats.shape == (5, 384) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert model.training  # mode restored
    with torch.no_grad():
        direct = model.eval()(tt(cache.batch(idx)))
    assert torch.allclose(feats, direct, atol=1e-5)
    enc = extract_features(vit_clip.encode_image, cache, None, tt, CPU, batch_size=16)
    assert enc.shape == (40, 128)
    sie = ReIDModel(vit_clip, 8, num_cameras=2)
    f_sie = extract_features(sie, cache, idx, tt, CPU, cam_ids=cams)
    assert f_sie.shape == (5, 384)

    hist = [{"epoch": e, "loss": 3.0 / e, "id": 2.0 / e, "triplet": 1.0 / e, "i2t": 1.5 / e, "acc": 0.2 * e,
             "id_acc": 0.1 * e, "lr": 1e-5} for e in (1, 2, 3)]
    panels = {"loss terms": ["loss", "id", "triplet", "i2t"], "train accuracy": ["acc", "id_acc"], "learning rate": ["lr"]}
    png = plot_training_history(hist, panels, tmp_path / "curves.png", title="stage 2")
    assert png.read_bytes()[:4] == b"\x89PNG"
