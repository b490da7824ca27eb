"""CLIP-style pre-training on a captioned folder: the loss falls, zero-shot retrieval beats chance, the
saved model is OpenAI's format that ``clip.load`` reads back, runs are seeded, bad captions are named."""

from __future__ import annotations

import json

import pytest
import torch

from reid_pipeline.embedded.synthetic import generate_synthetic_dataset
from reid_pipeline.embedded.tiny_clip import build_tiny_clip
from reid_pipeline.model.clip_loader import import_clip, load_clip
from reid_pipeline.training.clip_pretrain import (
    CaptionsError,
    PretrainConfig,
    _image_features,
    pretrain_clip,
    pretrain_clip_folder,
    read_captions,
    retrieval_accuracy,
)

SIZE = (64, 32)  # 4 × 2 patches of 16: fast on a CPU
TINY = PretrainConfig(epochs=30, batch_size=32, instances_per_group=2, lr=2e-3, warmup_epochs=2,
                      input_size=SIZE, holdout_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pre") / "captioned"
    generate_synthetic_dataset(root, num_ids=48, images_per_id=5, num_cameras=3, height=64, width=32, seed=7,
                               num_distractors=0, num_junk=0)
    return root


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("clip") / "pretrained.pt"
    result = pretrain_clip_folder(folder, build_tiny_clip("vit-small", seed=0), out, TINY, progress=False, log=None)
    return result, out


def test_loss_falls_and_zero_shot_retrieval_beats_chance(trained):
    result, _ = trained
    losses = result.loss_per_epoch
    assert len(losses) == TINY.epochs
    assert losses[-1] < losses[0] - 0.8 and min(losses[-5:]) < min(losses[:5]) - 0.8, losses
    r = result.retrieval
    assert result.holdout_images == r["num_images"] > 0 and r["chance"] < 0.1  # 12 held-out people
    assert r["image_to_caption_top1"] >= 2.5 * r["chance"], r
    assert "zero-shot image→caption" in result.summary()


def test_saved_weights_load_through_clip_load(trained, folder):
    result, out = trained
    clip = import_clip()
    reloaded, _ = clip.load(str(out), device="cpu", jit=False)  # OpenAI's own loader
    reloaded = reloaded.float().eval()
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["retrieval"] == result.retrieval and sidecar["config"]["input_size"] == list(SIZE)
    x = torch.randn(3, 3, *SIZE)
    text = clip.tokenize(["a person in a red t-shirt and black trousers"])
    with torch.no_grad():
        # the project's loader, adapted to the training size, gives what the training forward gave
        ours, info = load_clip(str(out), input_size=SIZE)
        assert info.embed_dim == 128
        assert torch.allclose(ours.encode_image(x), _image_features(reloaded, x), atol=1e-5)
        # ... and the weights are the trained ones up to OpenAI's fp16 storage
        assert torch.allclose(_image_features(result.model, x), _image_features(reloaded, x), rtol=0.02, atol=0.02)
        assert torch.allclose(result.model.encode_text(text), reloaded.encode_text(text), rtol=0.02, atol=0.02)
    trained_emb = result.model.token_embedding.weight
    fresh_emb = build_tiny_clip("vit-small", seed=0).token_embedding.weight
    used = torch.unique(clip.tokenize([r.caption for r in read_captions(folder)]))
    unused = torch.ones(len(fresh_emb), dtype=torch.bool)
    unused[used] = False
    assert not torch.equal(trained_emb[used], fresh_emb[used])  # the caption tokens were trained
    assert torch.equal(trained_emb[unused], fresh_emb[unused])  # the rest left as initialised


def test_same_seed_same_weights(folder):
    torch.set_num_threads(1)
    records = read_captions(folder)
    short = TINY.model_copy(update={"epochs": 2, "holdout_fraction": 0.0})
    a = pretrain_clip(build_tiny_clip("vit-small", 0), folder, records, short, progress=False, log=None)
    b = pretrain_clip(build_tiny_clip("vit-small", 0), folder, records, short, progress=False, log=None)
    c = pretrain_clip(build_tiny_clip("vit-small", 0), folder, records, short.model_copy(update={"seed": 1}),
                      progress=False, log=None)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.retrieval == {} and a.holdout_images == 0


def test_orthogonal_projections_keep_every_direction_and_the_temperature_learns(folder, tmp_path):
    """With ``orthogonal_projections`` both output projections leave training orthogonal up to the
    calibration's one scale each (all singular values equal), as plain parameters that save and load in
    OpenAI's format; ``logit_scale_lr`` moves the temperature further than the main learning rate does."""
    torch.set_num_threads(1)
    records = read_captions(folder)
    base = TINY.model_copy(update={"epochs": 2, "holdout_fraction": 0.0})
    free = pretrain_clip(build_tiny_clip("vit-small", 0), folder, records, base, progress=False, log=None)
    cfg = base.model_copy(update={"orthogonal_projections": True, "logit_scale_lr": 0.1})
    ortho = pretrain_clip(build_tiny_clip("vit-small", 0), folder, records, cfg, progress=False, log=None)
    for name, w in (("text", ortho.model.text_projection), ("image", ortho.model.visual.proj)):
        assert isinstance(w, torch.nn.Parameter), name  # the parametrisation is gone
        sv = torch.linalg.svdvals(w.detach().double())
        assert float(sv.max() / sv.min()) < 1.001, (name, sv)
    free_sv = torch.linalg.svdvals(free.model.text_projection.detach().double())
    assert float(free_sv.max() / free_sv.min()) > 1.5  # a free projection is not orthogonal
    start = build_tiny_clip("vit-small", 0).logit_scale.item()
    moved_free, moved_ortho = (abs(r.model.logit_scale.item() - start) for r in (free, ortho))
    assert moved_ortho > 5 * moved_free, (moved_free, moved_ortho)
    out = tmp_path / "ortho.pt"
    pretrain_clip_folder(folder, build_tiny_clip("vit-small", 0), out, cfg.model_copy(update={"epochs": 1}),
                         progress=False, log=None)
    reloaded, _ = import_clip().load(str(out), device="cpu", jit=False)
    sv = torch.linalg.svdvals(reloaded.text_projection.detach().double())
    assert float(sv.max() / sv.min()) < 1.01  # fp16 storage
    # a ViT whose image tower is wider than the embedding (256 → 128): named, not trained
    with pytest.raises(ValueError, match=r"square output projections.*proj \(256, 128\)"):
        pretrain_clip(build_tiny_clip("vit", 0), folder, records, cfg, progress=False, log=None)


def test_retrieval_accuracy_counts_group_hits():
    img = torch.eye(4)
    txt = torch.eye(4)[[1, 0, 2, 3]]  # captions of images 0 and 1 swapped
    exact = retrieval_accuracy(img, txt, [0, 1, 2, 3])
    assert exact["image_to_caption_top1"] == 0.5 and exact["chance"] == 0.25
    grouped = retrieval_accuracy(img, txt, [0, 0, 2, 3])  # 0 and 1 show the same person
    assert grouped["image_to_caption_top1"] == 1.0 and grouped["caption_to_image_top1"] == 1.0
    with pytest.raises(ValueError, match="one text feature and one group per image"):
        retrieval_accuracy(img, txt[:3], [0, 1, 2, 3])


def test_bad_captions_files_are_named(tmp_path, folder):
    with pytest.raises(CaptionsError, match="does not exist"):
        read_captions(tmp_path)
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"image": "x.jpg", "caption": "a person"}\nnot json\n')
    with pytest.raises(CaptionsError, match=r"c.jsonl:1: image 'x.jpg' not found"):
        read_captions(folder, bad)
    image = next(folder.rglob("*.jpg")).relative_to(folder).as_posix()
    bad.write_text(json.dumps({"image": image, "caption": "a person"}) + "\nnot json\n")
    with pytest.raises(CaptionsError, match=r"c.jsonl:2: not valid JSON"):
        read_captions(folder, bad)
    bad.write_text(json.dumps({"image": image, "text": "a person"}) + "\n")
    with pytest.raises(CaptionsError, match=r"c.jsonl:1: expected an object with string fields"):
        read_captions(folder, bad)
    bad.write_text(json.dumps({"image": image, "caption": "a person", "pid": "7"}) + "\n")
    with pytest.raises(CaptionsError, match="'pid' must be an integer"):
        read_captions(folder, bad)
    bad.write_text(json.dumps({"image": image, "caption": "a person"}) + "\n")
    with pytest.raises(CaptionsError, match="at least 2"):
        read_captions(folder, bad)


def test_the_embedded_clip_is_kept_until_its_captions_change(folder, tmp_path):
    """``make embedded`` keeps a pre-trained CLIP whose sidecar records the same recipe; new caption
    wording (another captions.jsonl) is another recipe, so the CLIP is trained again."""
    import shutil

    from reid_pipeline.embedded import build

    data = tmp_path / "pretrain-captions"
    shutil.copytree(folder, data)
    clip_path = tmp_path / "clip.pt"
    clip_path.write_bytes(b"kept")
    (tmp_path / "clip.pt.json").write_text(json.dumps({"recipe": build._recipe(data, TINY)}))
    assert build.ensure_pretrained_clip(clip_path, data, TINY, progress=False) == clip_path
    assert clip_path.read_bytes() == b"kept"  # nothing trained, nothing overwritten
    before = build._recipe(data, TINY)
    captions = data / "captions.jsonl"
    lines = captions.read_text().splitlines()
    first = json.loads(lines[0])
    first["caption"] = first["caption"] + ", seen on a sunny day"
    captions.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    after = build._recipe(data, TINY)
    assert after != before and after["captions_sha256"] != before["captions_sha256"]
    assert {k: v for k, v in after.items() if k != "captions_sha256"} == {
        k: v for k, v in before.items() if k != "captions_sha256"}
