"""Frozen-CLIP loading through openai-clip's own clip.load, and the ReID adaptation."""

from __future__ import annotations

import zipfile

import pytest
import torch

from reid_pipeline.embedded.tiny_clip import build_tiny_clip
from reid_pipeline.model.clip_loader import (
    ClipWeightsError,
    adapt_visual,
    import_clip,
    load_clip,
    resolve_model_name,
    save_clip_archive,
    visual_grid,
)


def test_save_tiny_then_clip_load_gives_identical_outputs(tiny_clip_path):
    clip = import_clip()
    reference, _ = clip.load(str(tiny_clip_path), device="cpu", jit=False)
    ours, info = load_clip(str(tiny_clip_path), input_size=(224, 224))
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    text = clip.tokenize(["a photo of a person.", "a photo of a X X X X person."])
    with torch.no_grad():
        assert torch.equal(reference.encode_image(image), ours.encode_image(image))
        assert torch.equal(reference.encode_text(text), ours.encode_text(text))
    assert info.arch == "vit" and info.embed_dim == 128 and info.text_width == 128
    assert info.context_length == 77 and info.vocab_size == 49408
    assert len(info.sha256) == 64


def test_tiny_clip_is_deterministic(tmp_path):
    a = build_tiny_clip("vit", seed=3).state_dict()
    b = build_tiny_clip("vit", seed=3).state_dict()
    c = build_tiny_clip("vit", seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.conv1.weight"], c["visual.conv1.weight"])


def test_all_parameters_frozen(tiny_clip_path):
    model, _ = load_clip(str(tiny_clip_path))
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("stride", [None, 16, 12])
def test_vit_runs_at_reid_size(tiny_clip_path, stride):
    model, info = load_clip(str(tiny_clip_path), input_size=(256, 128), stride=stride)
    h, w = visual_grid((256, 128), 16, stride or 16)
    assert model.visual.grid_hw == (h, w)
    assert model.visual.positional_embedding.shape == (h * w + 1, 256)
    with torch.no_grad():
        out = model.encode_image(torch.randn(2, 3, 256, 128))
    assert out.shape == (2, 128) and torch.isfinite(out).all()
    assert info.stride == (stride or 16)
    if stride == 12:
        assert (h, w) == (21, 10)


def test_positional_embedding_resize_keeps_class_token(tiny_clip_path):
    clip = import_clip()
    raw, _ = clip.load(str(tiny_clip_path), device="cpu", jit=False)
    model, _ = load_clip(str(tiny_clip_path), input_size=(256, 128))
    assert torch.equal(model.visual.positional_embedding[0], raw.visual.positional_embedding[0].float())
    # Resizing to the original grid is the identity.
    same, _ = load_clip(str(tiny_clip_path), input_size=(224, 224))
    assert torch.allclose(same.visual.positional_embedding, raw.visual.positional_embedding.float(), atol=1e-6)


def test_resnet_clip_last_stride_one(tiny_rn_clip_path):
    model, info = load_clip(str(tiny_rn_clip_path), input_size=(256, 128))
    assert info.arch == "resnet" and model.visual.grid_hw == (16, 8)
    assert model.visual.attnpool.positional_embedding.shape[0] == 16 * 8 + 1
    with torch.no_grad():
        x = _stem(model.visual, torch.randn(1, 3, 256, 128))
        feats = model.visual.layer4(model.visual.layer3(model.visual.layer2(model.visual.layer1(x))))
        assert feats.shape[-2:] == (16, 8)
        assert model.encode_image(torch.randn(2, 3, 256, 128)).shape == (2, 128)
    with pytest.raises(ValueError, match="ViT"):
        load_clip(str(tiny_rn_clip_path), stride=12)


def _stem(visual, x):
    x = visual.relu1(visual.bn1(visual.conv1(x)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.relu3(visual.bn3(visual.conv3(x)))
    return visual.avgpool(x)


def test_aliases():
    assert resolve_model_name("vitb16") == "ViT-B/16"
    assert resolve_model_name("RN50") == "RN50"
    assert resolve_model_name("rn50") == "RN50"
    assert resolve_model_name("/some/file.pt") == "/some/file.pt"


def test_missing_weights_names_the_file(tmp_path):
    with pytest.raises(ClipWeightsError, match="nope.pt.*no such file"):
        load_clip(str(tmp_path / "nope.pt"))


def test_corrupt_weights(tmp_path, tiny_clip_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_clip_path.read_bytes()[:5000])
    with pytest.raises(ClipWeightsError, match="truncated.pt"):
        load_clip(str(truncated))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ClipWeightsError, match="empty file"):
        load_clip(str(empty))


def test_foreign_weights(tmp_path):
    foreign = tmp_path / "resnet18.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(10)}, foreign)
    with pytest.raises(ClipWeightsError, match=r"resnet18.pt: not OpenAI CLIP weights.*conv1.weight"):
        load_clip(str(foreign))
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(scripted))
    with pytest.raises(ClipWeightsError, match="scripted.pt"):
        load_clip(str(scripted))


def test_plain_state_dict_zip_is_read(tmp_path):
    """A plain torch.save state dict (clip.load's own fallback fails on it) still loads."""
    model = build_tiny_clip("vit", seed=1)
    path = tmp_path / "state.pt"
    torch.save(model.state_dict(), path)
    assert zipfile.is_zipfile(path)
    loaded, info = load_clip(str(path), input_size=(224, 224))
    assert info.embed_dim == 128
    ref_path = tmp_path / "archive.pt"
    save_clip_archive(build_tiny_clip("vit", seed=1), ref_path)
    ref, _ = load_clip(str(ref_path), input_size=(224, 224))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), ref.encode_image(x))


def test_bad_stride(tiny_clip_path):
    with pytest.raises(ValueError, match="stride"):
        load_clip(str(tiny_clip_path), stride=20)


def test_adapt_twice_from_adapted_grid():
    model = build_tiny_clip("vit")
    adapt_visual(model, (256, 128))
    adapt_visual(model, (256, 128), stride=12)
    assert model.visual.grid_hw == (21, 10)
