"""Stage-1 loss and training loop: the formula, learning, resume, frozen CLIP, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.tiny_clip import build_tiny_clip
from reid_pipeline.model.prompt import PromptLearner, TextEncoder, encode_labels
from reid_pipeline.training.schedulers import warmup_cosine_lr
from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.storage import CheckpointError
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.loop import COMMON_FIELDS
from reid_pipeline.training.stage1 import (
    NonFiniteLossError,
    Stage1Config,
    Stage1Error,
    train_prompts,
)
from reid_pipeline.training.supcon import average_positives, stage1_loss, supcon_loss

CPU = resolve_device("cpu", "fp32")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def learnable_data(num_classes=12, per_class=10, dim=128, seed=0):
    """Images of each class clustered around a random centre: prompts can learn to match them."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    centres = torch.randn(num_classes, dim, generator=g)
    feats = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def small_config(**kw) -> Stage1Config:
    base = dict(epochs=6, batch_size=16, warmup_epochs=1, lr=5e-3, seed=3)
    return Stage1Config(**{**base, **kw})


# -- the loss ---------------------------------------------------------------------------------------


def slow_supcon(a, b, la, lb):
    """Direct formula with python loops: −mean_i mean_{j: lb_j = la_i} log softmax_j(a_i · b_j)."""
    total = 0.0
    for i in range(a.shape[0]):
        logits = [float(a[i].double() @ b[j].double()) for j in range(b.shape[0])]
        m = max(logits)
        log_z = math.log(sum(math.exp(x - m) for x in logits))
        pos = [logits[j] - m - log_z for j in range(b.shape[0]) if int(lb[j]) == int(la[i])]
        total += -sum(pos) / len(pos)
    return total / a.shape[0]


def test_supcon_matches_slow_formula():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(9, 16, generator=g) * 2
    txt = torch.randn(9, 16, generator=g) * 2
    y = torch.tensor([0, 1, 0, 2, 2, 2, 3, 1, 4])
    fast = supcon_loss(img, txt, y, y)
    assert abs(float(fast) - slow_supcon(img, txt, y, y)) < 1e-5
    # asymmetric sizes and labels (rows need a positive among the columns)
    t_lab = torch.tensor([1, 0, 2, 3, 4, 0])
    assert abs(float(supcon_loss(img, txt[:6], y, t_lab)) - slow_supcon(img, txt[:6], y, t_lab)) < 1e-5
    both = stage1_loss(img, txt, y)
    assert abs(float(both) - slow_supcon(img, txt, y, y) - slow_supcon(txt, img, y, y)) < 1e-5
    # large logits: the max subtraction keeps it finite
    assert torch.isfinite(supcon_loss(img * 100, txt * 100, y, y))


def test_supcon_errors_and_average_positives():
    with pytest.raises(ValueError, match="no positive"):
        supcon_loss(torch.randn(2, 4), torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="empty batch"):
        supcon_loss(torch.randn(0, 4), torch.randn(0, 4), torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="feature dims differ"):
        supcon_loss(torch.randn(2, 4), torch.randn(2, 5), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert average_positives(torch.tensor([0, 1, 2, 3])) == 1.0
    assert average_positives(torch.tensor([0, 0, 1, 2])) == pytest.approx(6 / 4)
    assert average_positives(torch.tensor([5, 5, 5])) == 3.0


# -- the loop ---------------------------------------------------------------------------------------


def test_loss_falls_and_clip_stays_bit_identical():
    model = build_tiny_clip("vit", seed=0)  # parameters require grad: the loop must not touch them
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, labels = learnable_data()
    logs = []
    lines: list[str] = []
    result = train_prompts(model, feats, labels, 12, small_config(epochs=8), CPU, on_epoch_end=logs.append,
                           log=lines.append)
    assert len(result.loss_per_epoch) == 8 and result.final_loss == result.loss_per_epoch[-1]
    assert result.loss_per_epoch[-1] < 0.5 * result.loss_per_epoch[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored
    assert [e["epoch"] for e in logs] == list(range(1, 9))
    assert {*COMMON_FIELDS, "avg_positives"} <= set(logs[0]) and result.history == logs
    assert len(lines) == 8 and lines[-1].startswith("stage 1 epoch 8/8: loss") and "avg_positives" in lines[-1]
    assert [e["lr"] for e in logs] == [warmup_cosine_lr(i, 5e-3, 8, 1, 1e-5, 1e-6) for i in range(1, 9)]
    assert logs[-1]["eta_s"] == 0 and logs[0]["steps"] == math.ceil(120 / 16)
    assert 1.0 <= result.avg_positives <= 16 and result.samples_per_s > 0 and result.wall_time_s > 0
    # the learned prompts now pick their own class's images
    encoder = TextEncoder(model)
    with torch.no_grad():
        text = encode_labels(result.prompt_learner, encoder, torch.arange(12))
    accuracy = float(((feats @ text.T).argmax(1) == labels).float().mean())
    assert accuracy > 0.5


def test_never_an_empty_last_batch(clip_model):
    feats, labels = learnable_data(num_classes=4, per_class=8)  # 32 images, batch 16: exactly 2 steps
    steps = []
    result = train_prompts(clip_model, feats, labels, 4, small_config(epochs=2), CPU,
                           on_epoch_end=lambda e: steps.append(e["steps"]))
    assert steps == [2, 2] and all(math.isfinite(x) for x in result.loss_per_epoch)
    steps.clear()
    feats, labels = learnable_data(num_classes=3, per_class=11)  # 33 images
    train_prompts(clip_model, feats, labels, 3, small_config(epochs=1), CPU, on_epoch_end=lambda e: steps.append(e["steps"]))
    assert steps == [3]  # 16 + 16 + 1


def test_exact_savings_do_not_change_training(clip_model):
    feats, labels = learnable_data(num_classes=6, per_class=6)
    fast = train_prompts(clip_model, feats, labels, 6, small_config(epochs=3), CPU)
    slow = train_prompts(
        clip_model, feats, labels, 6,
        small_config(epochs=3, truncate_context=False, distinct_labels=False, prefix_cache=False), CPU,
    )
    a, b = fast.prompt_learner.cls_ctx.detach(), slow.prompt_learner.cls_ctx.detach()
    assert float((a - b).norm() / b.norm()) < 1e-4
    assert fast.loss_per_epoch == pytest.approx(slow.loss_per_epoch, rel=1e-5)


def test_same_seed_same_tokens(clip_model):
    feats, labels = learnable_data(num_classes=6, per_class=6)
    a = train_prompts(clip_model, feats, labels, 6, small_config(epochs=2), CPU)
    b = train_prompts(clip_model, feats, labels, 6, small_config(epochs=2), CPU)
    c = train_prompts(clip_model, feats, labels, 6, small_config(epochs=2, seed=4), CPU)
    assert torch.equal(a.prompt_learner.cls_ctx, b.prompt_learner.cls_ctx)
    assert not torch.equal(a.prompt_learner.cls_ctx, c.prompt_learner.cls_ctx)


class Killed(Exception):
    pass


def kill_at(epoch: int):
    """An on_epoch_end callback that dies at ``epoch`` (after its checkpoint), like a killed process."""
    def log(entry):
        if entry["epoch"] == epoch:
            raise Killed(epoch)

    return log


@pytest.mark.parametrize("every,kill", [(1, 2), (2, 3)])
def test_resume_equals_uninterrupted(clip_model, tmp_path, every, kill):
    feats, labels = learnable_data(num_classes=8, per_class=5)
    config = small_config(epochs=5, checkpoint_every=every)
    straight = train_prompts(clip_model, feats, labels, 8, config, CPU)

    state = tmp_path / "stage1_state.safetensors"
    with pytest.raises(Killed):
        train_prompts(clip_model, feats, labels, 8, config, CPU, state_path=state, on_epoch_end=kill_at(kill))
    assert state.is_file()
    resumed = train_prompts(clip_model, feats, labels, 8, config, CPU, state_path=state)
    assert resumed.resumed_from_epoch == (kill // every) * every
    assert torch.equal(resumed.prompt_learner.cls_ctx, straight.prompt_learner.cls_ctx)
    assert resumed.loss_per_epoch == straight.loss_per_epoch
    # a finished state is not trained again
    again = train_prompts(clip_model, feats, labels, 8, config, CPU, state_path=state)
    assert again.resumed_from_epoch == 5 and torch.equal(again.prompt_learner.cls_ctx, straight.prompt_learner.cls_ctx)
    assert again.loss_per_epoch == straight.loss_per_epoch


def test_resume_refuses_a_foreign_state(clip_model, tmp_path):
    feats, labels = learnable_data(num_classes=4, per_class=4)
    state = tmp_path / "state.safetensors"
    train_prompts(clip_model, feats, labels, 4, small_config(epochs=1), CPU, state_path=state)
    with pytest.raises(CheckpointError, match="different stage 1 run.*config.lr: saved 0.005 vs now 0.001"):
        train_prompts(clip_model, feats, labels, 4, small_config(epochs=1, lr=1e-3), CPU, state_path=state)
    with pytest.raises(CheckpointError, match="different stage 1 run.*data: saved"):
        train_prompts(clip_model, feats + 1, labels, 4, small_config(epochs=1), CPU, state_path=state)
    # checkpoint frequency may change between a run and its resume
    train_prompts(clip_model, feats, labels, 4, small_config(epochs=1, checkpoint_every=3), CPU, state_path=state)


def test_bad_inputs_are_clear_errors(clip_model):
    feats, labels = learnable_data(num_classes=4, per_class=4)
    cfg = small_config(epochs=1)
    with pytest.raises(Stage1Error, match=r"labels must lie in \[0, 3\).*\[0, 3\]"):
        train_prompts(clip_model, feats, labels, 3, cfg, CPU)
    with pytest.raises(Stage1Error, match=r"\[-1, 3\]"):
        train_prompts(clip_model, feats, torch.cat([labels[:-1], torch.tensor([-1])]), 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="image feature dim 64 != the CLIP model's embed dim 128"):
        train_prompts(clip_model, feats[:, :64], labels, 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="15 labels for 16 image features"):
        train_prompts(clip_model, feats, labels[:15], 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="integer"):
        train_prompts(clip_model, feats, labels.float(), 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="non-finite"):
        train_prompts(clip_model, torch.full_like(feats, float("nan")), labels, 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="empty"):
        train_prompts(clip_model, feats[:0], labels[:0], 4, cfg, CPU)
    with pytest.raises(Stage1Error, match="ending in .safetensors"):
        train_prompts(clip_model, feats, labels, 4, cfg, CPU, state_path="state.pt")


def test_non_finite_loss_names_epoch_and_step(clip_model):
    feats, labels = learnable_data(num_classes=4, per_class=4)
    huge = feats.sign() * torch.finfo(torch.float32).max / 2  # finite, but dot products overflow float32
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1 of 1"):
        train_prompts(clip_model, huge, labels, 4, small_config(epochs=2), CPU)


def test_config_presets_and_validation():
    assert Stage1Config.paper("vit").epochs == 120 and Stage1Config.paper("resnet").epochs == 60
    cfg = Stage1Config()
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup_epochs, cfg.warmup_lr_init, cfg.min_lr) == (
        64, 3.5e-4, 1e-4, 5, 1e-5, 1e-6)
    assert cfg.resolved_template() == "A photo of a X X X X person."
    assert Stage1Config(subject="vehicle").resolved_template() == "A photo of a X X X X vehicle."
    assert Stage1Config.paper("resnet", seed=7).seed == 7
    with pytest.raises(ValueError, match="arch"):
        Stage1Config.paper("swin")
    with pytest.raises(ValueError):
        Stage1Config(epoch=3)  # typo: extra fields are refused
    with pytest.raises(ValueError):
        Stage1Config(batch_size=0)


def test_result_tokens_load_into_a_fresh_learner(clip_model):
    feats, labels = learnable_data(num_classes=4, per_class=4)
    result = train_prompts(clip_model, feats, labels, 4, small_config(epochs=1), CPU)
    fresh = PromptLearner(4, clip_model)
    fresh.load_state_dict(result.prompt_learner.state_dict())
    assert torch.equal(fresh.cls_ctx, result.prompt_learner.cls_ctx)


# -- on a GPU (skipped without CUDA) ------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_fp32_matches_cpu_and_leaves_the_callers_clip_alone():
    model = build_tiny_clip("vit", seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, labels = learnable_data(num_classes=6, per_class=6)
    cpu = train_prompts(model, feats, labels, 6, small_config(epochs=3), CPU)
    gpu = train_prompts(model, feats, labels, 6, small_config(epochs=3), resolve_device("cuda", "fp32"))
    assert gpu.prompt_learner.cls_ctx.device.type == "cuda"
    assert all(v.device.type == "cpu" for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert gpu.loss_per_epoch == pytest.approx(cpu.loss_per_epoch, rel=1e-3)
    a, b = gpu.prompt_learner.cls_ctx.detach().cpu(), cpu.prompt_learner.cls_ctx.detach()
    assert float((a - b).norm() / b.norm()) < 1e-2


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_trains_and_resumes(tmp_path, precision):
    model = build_tiny_clip("vit", seed=0)
    spec = resolve_device("cuda", precision)
    feats, labels = learnable_data()
    result = train_prompts(model, feats, labels, 12, small_config(epochs=8), spec)
    assert all(math.isfinite(x) for x in result.loss_per_epoch)
    assert result.loss_per_epoch[-1] < 0.5 * result.loss_per_epoch[0]
    state = tmp_path / "state.safetensors"
    with pytest.raises(Killed):
        train_prompts(model, feats, labels, 12, small_config(epochs=4), spec, state_path=state, on_epoch_end=kill_at(2))
    resumed = train_prompts(model, feats, labels, 12, small_config(epochs=4), spec, state_path=state)
    straight = train_prompts(model, feats, labels, 12, small_config(epochs=4), spec)
    assert resumed.resumed_from_epoch == 2
    assert resumed.loss_per_epoch == pytest.approx(straight.loss_per_epoch, rel=1e-2)


@cuda
def test_cuda_image_features_and_exact_encoder():
    model = build_tiny_clip("vit", seed=0).cuda()
    images = torch.randn(6, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    cache = ImageCache.from_tensors([(img * 40 + 128).clamp(0, 255).to(torch.uint8) for img in images])
    transform = TestTransform((224, 224), *normalization_for("vit"))
    feats = extract_features(model.encode_image, cache, None, transform, resolve_device("cuda", "bf16"), batch_size=4)
    images = transform(cache.batch(list(range(6))))
    with torch.no_grad():
        direct = model.encode_image(images.cuda()).cpu()
    assert feats.device.type == "cpu" and feats.dtype == torch.float32
    assert float((feats - direct).norm() / direct.norm()) < 3e-2
    short = PromptLearner(5, model).cuda()
    full = PromptLearner(5, model, truncate=False).cuda()
    full.load_state_dict(short.state_dict())
    labels = torch.tensor([4, 0, 4, 2], device="cuda")
    encoder = TextEncoder(model)
    with torch.no_grad():
        a = encode_labels(short, encoder, labels)
        x = model.transformer((full(labels) + model.positional_embedding).permute(1, 0, 2)).permute(1, 0, 2)
        b = model.ln_final(x)[:, full.eot_index] @ model.text_projection
    assert float((a - b).norm() / b.norm()) < 1e-5


def test_torn_checkpoint_is_detected_not_resumed(clip_model, tmp_path):
    """The same mechanism as stage 2 (the shared loop): tensors of epoch 1 with the sidecar of epoch 2."""
    feats, labels = learnable_data(num_classes=4, per_class=4)
    config = small_config(epochs=3)
    state = tmp_path / "state.safetensors"
    with pytest.raises(Killed):
        train_prompts(clip_model, feats, labels, 4, config, CPU, state_path=state, on_epoch_end=kill_at(1))
    epoch1_tensors = state.read_bytes()
    with pytest.raises(Killed):
        train_prompts(clip_model, feats, labels, 4, config, CPU, state_path=state, on_epoch_end=kill_at(2))
    state.write_bytes(epoch1_tensors)
    with pytest.raises(CheckpointError, match=r"torn checkpoint \(tensors from epoch 1, sidecar state.json from epoch 2"):
        train_prompts(clip_model, feats, labels, 4, config, CPU, state_path=state)


def test_stage1_ceiling_free_prototypes_separate_classes():
    """benchmarks/stage1_ceiling.py's ceiling: free class vectors of a fixed length, trained with the
    stage-1 loss, classify well-separated classes far above random vectors."""
    import importlib.util

    from reid_pipeline.pipeline import image_to_prompt_accuracy
    from reid_pipeline_tests.conftest import PROJECT_ROOT

    spec = importlib.util.spec_from_file_location("stage1_ceiling", PROJECT_ROOT / "benchmarks" / "stage1_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(12, 16, generator=gen), dim=1) * 3.0
    labels = torch.arange(12).repeat_interleave(6)
    features = centres[labels] + 0.6 * torch.randn(len(labels), 16, generator=gen)
    chance_level = image_to_prompt_accuracy(features, labels, torch.randn(12, 16, generator=gen))
    directions = module.free_prototypes(features, labels, 12, length=3.0, epochs=20, batch_size=16, seed=0)
    assert directions.shape == (12, 16) and not directions.requires_grad
    accuracy = image_to_prompt_accuracy(features, labels, directions)
    assert accuracy >= 0.95 > chance_level + 0.5, (accuracy, chance_level)
