"""Stage-1 prompts: the template, per-label gathering, and the exact (truncated, cached) text encoder."""

from __future__ import annotations

import pytest
import torch

from reid_pipeline.embedded.tiny_clip import build_tiny_clip
from reid_pipeline.model.clip_loader import import_clip
from reid_pipeline.model.prompt import (
    PromptError,
    PromptLearner,
    TextEncoder,
    default_template,
    encode_all_classes,
    encode_labels,
    load_prompt_tokens,
    prompt_meta,
    prompt_state,
)
from reid_pipeline.storage import save_tensors

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def clip_full_context(clip_model, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """CLIP's own computation: all 77 positions through ``clip_model.transformer`` (its 77×77 mask)."""
    x = prompts + clip_model.positional_embedding
    x = clip_model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = clip_model.ln_final(x)
    return x[torch.arange(x.shape[0]), eot] @ clip_model.text_projection


def learners(clip_model, num_classes=6, seed=0):
    short = PromptLearner(num_classes, clip_model, generator=torch.Generator().manual_seed(seed))
    full = PromptLearner(num_classes, clip_model, truncate=False)
    full.load_state_dict(short.state_dict())
    return short, full


def test_template_layout_matches_clip_tokens(clip_model):
    clip = import_clip()
    pl = PromptLearner(3, clip_model)
    tokens = clip.tokenize("A photo of a X X X X person.")[0]
    assert pl.template == "A photo of a X X X X person." == default_template(4, "person")
    assert (pl.prefix_length, pl.eot_index, pl.context_length) == (5, 11, 12)
    assert pl.cls_ctx.shape == (3, 4, 128)
    with torch.no_grad():
        emb = clip_model.token_embedding(tokens.long())
    assert torch.equal(pl.token_prefix[0], emb[:5])
    assert torch.equal(pl.token_suffix[0], emb[9:12])
    # only the learnable tokens are state; the buffers come from CLIP
    assert list(pl.state_dict()) == ["cls_ctx"]
    assert PromptLearner(3, clip_model, truncate=False).context_length == 77


def test_vehicle_subject_and_bad_templates(clip_model):
    car = PromptLearner(2, clip_model, subject="vehicle")
    assert car.template == "A photo of a X X X X vehicle."
    person = PromptLearner(2, clip_model)
    assert not torch.equal(car.token_suffix, person.token_suffix)
    assert torch.equal(car.token_prefix, person.token_prefix)
    with pytest.raises(PromptError, match="exactly n_ctx=4 consecutive 'X'"):
        PromptLearner(2, clip_model, template="A photo of a X X person.")
    with pytest.raises(PromptError, match="found 0"):
        PromptLearner(2, clip_model, template="A photo of a person.")
    with pytest.raises(PromptError, match="num_classes"):
        PromptLearner(0, clip_model)
    six = PromptLearner(2, clip_model, n_ctx=6)
    assert six.template == "A photo of a X X X X X X person." and six.context_length == 14


def test_init_is_seeded_normal(clip_model):
    a = PromptLearner(200, clip_model, generator=torch.Generator().manual_seed(3))
    b = PromptLearner(200, clip_model, generator=torch.Generator().manual_seed(3))
    c = PromptLearner(200, clip_model, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.cls_ctx, b.cls_ctx) and not torch.equal(a.cls_ctx, c.cls_ctx)
    ctx = a.cls_ctx.detach()
    assert abs(float(ctx.std()) - 0.02) < 1e-3 and abs(float(ctx.mean())) < 1e-3


def test_forward_gathers_only_the_labels_prompts(clip_model):
    pl = PromptLearner(5, clip_model, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([4, 1, 4, 0])
    prompts = pl(labels)
    assert prompts.shape == (4, 12, 128)
    everything = pl.all_prompts()
    assert everything.shape == (5, 12, 128)
    for i, y in enumerate(labels.tolist()):
        assert torch.equal(prompts[i], everything[y])
        assert torch.equal(prompts[i, 5:9], pl.cls_ctx[y])
    prompts.sum().backward()
    touched = pl.cls_ctx.grad.abs().sum(dim=(1, 2)) > 0
    assert touched.tolist() == [True, True, False, False, True]
    # class 4 appears twice: its gradient accumulates
    assert torch.allclose(pl.cls_ctx.grad[4], 2 * pl.cls_ctx.grad[1])
    with pytest.raises(PromptError, match=r"\[0, 5\)"):
        pl(torch.tensor([0, 5]))
    with pytest.raises(PromptError, match="integer"):
        pl(torch.tensor([0.0]))


@pytest.mark.parametrize("distinct,prefix_cache", [(False, False), (True, False), (False, True), (True, True)])
def test_truncated_encoder_equals_full_context_at_eot(clip_model, distinct, prefix_cache):
    short, full = learners(clip_model)
    labels = torch.tensor([2, 0, 2, 5, 1, 2])
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        reference = clip_full_context(clip_model, full(labels), torch.full((6,), full.eot_index))
        ours = encode_labels(short, encoder, labels, distinct=distinct, prefix_cache=prefix_cache)
        ours_full = encode_labels(full, encoder, labels, distinct=distinct, prefix_cache=prefix_cache)
    assert ours.shape == (6, 128)
    assert rel(ours, reference) < TOL
    assert rel(ours_full, reference) < TOL


def test_prefix_states_computed_once_are_reusable(clip_model):
    pl = PromptLearner(6, clip_model, generator=torch.Generator().manual_seed(0))
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        states = encoder.prefix_states(pl.token_prefix)
    assert len(states) == 2 and states[0][0].shape == (1, 2, 5, 64)  # layers; (1, heads, P, head dim)
    for labels in (torch.tensor([0, 3, 3]), torch.tensor([5, 1])):
        once = encode_labels(pl, encoder, labels, prefix_kv=states)
        per_call = encode_labels(pl, encoder, labels)
        assert torch.equal(once, per_call)
    other = PromptLearner(2, clip_model, template="A person X X X X walking.")
    with pytest.raises(PromptError, match="prefix_kv covers 5 positions, the template's prefix has 3"):
        encode_labels(other, encoder, torch.tensor([0]), prefix_kv=states)


def test_encoder_matches_clip_encode_text_with_per_row_eot(clip_model):
    clip = import_clip()
    text = clip.tokenize(["a person.", "a photo of a person in a red coat.", "x"])
    encoder = TextEncoder(clip_model)
    with torch.no_grad():
        reference = clip_model.encode_text(text)
        ours = encoder(clip_model.token_embedding(text), text.argmax(dim=-1))
        # cut the context to the longest sequence: still the same
        cut = int(text.argmax(dim=-1).max()) + 1
        ours_cut = encoder(clip_model.token_embedding(text[:, :cut]), text.argmax(dim=-1))
    assert rel(ours, reference) < TOL and rel(ours_cut, reference) < TOL


def test_prompt_gradients_match_full_context(clip_model):
    short, full = learners(clip_model)
    labels = torch.tensor([3, 3, 1, 0])
    target = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    encoder = TextEncoder(clip_model)
    (encode_labels(short, encoder, labels) * target).sum().backward()
    x = clip_full_context(clip_model, full(labels), torch.full((4,), full.eot_index))
    (x * target).sum().backward()
    assert rel(short.cls_ctx.grad, full.cls_ctx.grad) < TOL
    assert short.cls_ctx.grad[[2, 4, 5]].abs().sum() == 0


def test_gradients_reach_only_the_prompt_tokens(clip_model):
    model = build_tiny_clip("vit", seed=1)  # parameters still require grad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pl = PromptLearner(4, model)
    encoder = TextEncoder(model)
    for p in model.parameters():
        p.requires_grad_(False)
    encode_labels(pl, encoder, torch.tensor([0, 1, 1])).pow(2).sum().backward()
    assert pl.cls_ctx.grad is not None and pl.cls_ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert pl.token_prefix.grad is None and pl.token_suffix.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_encode_all_classes(clip_model):
    pl = PromptLearner(7, clip_model, generator=torch.Generator().manual_seed(0))
    encoder = TextEncoder(clip_model)
    feats = encode_all_classes(pl, encoder, batch_size=3)
    assert feats.shape == (7, 128) and feats.dtype == torch.float32 and not feats.requires_grad
    with torch.no_grad():
        one_by_one = torch.cat([encode_labels(pl, encoder, torch.tensor([c])) for c in range(7)])
    assert rel(feats, one_by_one) < TOL
    with pytest.raises(PromptError, match="batch_size"):
        encode_all_classes(pl, encoder, batch_size=0)


def test_prompt_tokens_round_trip_and_errors(clip_model, tmp_path):
    pl = PromptLearner(4, clip_model, generator=torch.Generator().manual_seed(0))
    other = PromptLearner(4, clip_model, generator=torch.Generator().manual_seed(9))
    state = prompt_state(pl)
    assert list(state) == ["cls_ctx"] and state["cls_ctx"].shape == (4, 4, 128)
    load_prompt_tokens(other, state)
    assert torch.equal(other.cls_ctx, pl.cls_ctx)
    path = save_tensors(tmp_path / "prompts.safetensors", state, prompt_meta(pl))
    fresh = PromptLearner(4, clip_model)
    load_prompt_tokens(fresh, path)
    assert torch.equal(fresh.cls_ctx, pl.cls_ctx)
    assert prompt_meta(pl)["eot_index"] == 11
    with pytest.raises(PromptError, match="5 classes, expected 4"):
        load_prompt_tokens(fresh, {"cls_ctx": torch.zeros(5, 4, 128)})
    with pytest.raises(PromptError, match="text width 64, expected 128"):
        load_prompt_tokens(fresh, {"cls_ctx": torch.zeros(4, 4, 64)})
    with pytest.raises(PromptError, match="no 'cls_ctx'"):
        load_prompt_tokens(fresh, {"ctx": torch.zeros(4, 4, 128)})
    with pytest.raises(PromptError, match="non-finite"):
        load_prompt_tokens(fresh, {"cls_ctx": torch.full((4, 4, 128), float("nan"))})


def test_text_width_mismatch_is_a_clear_error(clip_model):
    clip = import_clip()
    torch.manual_seed(0)
    narrow = clip.model.CLIP(
        embed_dim=128, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1,
    )
    pl = PromptLearner(3, clip_model)
    with pytest.raises(PromptError, match="text width mismatch: prompt tokens have width 128.*expects 64"):
        encode_labels(pl, TextEncoder(narrow), torch.tensor([0]))
    with pytest.raises(PromptError, match=r"\(B, L, 64\)"):
        TextEncoder(narrow)(torch.zeros(1, 12, 128), 11)
    with pytest.raises(PromptError, match="openai-clip"):
        PromptLearner(3, torch.nn.Linear(2, 2))
