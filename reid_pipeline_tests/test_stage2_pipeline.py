"""Input pipeline of stage 2: decode-once cache, batched transforms vs PIL, P×K sampler."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import reid_pipeline.data.cache as cache_mod
from reid_pipeline_tests.reference_transforms import ReferenceTestTransform, ReferenceTrainTransform
from reid_pipeline.data.cache import ImageCache, ImageDecodeError, MixedSizeError
from reid_pipeline.data.sampler import PKSampler
from reid_pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentParams,
    TestTransform,
    TrainTransform,
    _resize_float_pil_like,
    flip_pad_crop,
    normalization_for,
    resize_uint8,
)

# ------------------------------------------------------------------ helpers


def person_like(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth-ish synthetic RGB image (gradients, blocks, mild noise) like a small ReID crop."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), dtype=np.float64)
    img[..., 0] = 255 * yy / max(h - 1, 1)
    img[..., 1] = 255 * xx / max(w - 1, 1)
    img[..., 2] = 128 + 100 * np.sin(yy / 5.0 + seed)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[top : top + h // 3, left : left + w // 3] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rels = []
    for i in range(12):
        h, w = (128, 64) if i < 9 else (96, 40)
        arr = person_like(h, w, i)
        rel = f"cam{i % 3}/{i:04d}.jpg" if i % 4 else f"cam{i % 3}/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if i == 5:
            Image.fromarray(arr).convert("L").save(root / rel)  # grayscale → RGB on decode
        else:
            Image.fromarray(arr).save(root / rel, quality=90)
        rels.append(rel)
    return root, rels


# ------------------------------------------------------------------ cache


def test_cache_memory_decodes_like_pil_once(image_dir):
    root, rels = image_dir
    cache = ImageCache.from_paths(root, rels, mode="memory", num_threads=2)
    assert len(cache) == 12
    imgs = cache.get(range(12))
    for rel, img in zip(rels, imgs):
        with Image.open(root / rel) as im:
            expected = to_chw(np.asarray(im.convert("RGB")))
        assert img.dtype == torch.uint8 and torch.equal(img, expected)
    assert cache.uniform_shape is None  # two stored sizes
    b = cache.batch([0, 3, 8])
    assert b.shape == (3, 3, 128, 64) and torch.equal(b[1], imgs[3])
    with pytest.raises(MixedSizeError, match="different stored sizes"):
        cache.batch([0, 10])
    mixed = cache.fetch([0, 10])
    assert isinstance(mixed, list) and mixed[1].shape == (3, 96, 40)
    with pytest.raises(IndexError, match="out of range"):
        cache.get([12])


def test_cache_uniform_fast_path_and_from_tensors():
    imgs = [torch.full((3, 4, 2), i, dtype=torch.uint8) for i in range(5)]
    cache = ImageCache.from_tensors(imgs)
    assert cache.uniform_shape == (3, 4, 2)
    out = cache.batch(torch.tensor([4, 0, 4]))
    assert out.shape == (3, 3, 4, 2) and out[:, 0, 0, 0].tolist() == [4, 0, 4]
    with pytest.raises(ValueError, match="uint8"):
        ImageCache.from_tensors([torch.zeros(3, 4, 2)])


def test_cache_disk_mode_is_written_reused_and_invalidated(image_dir, tmp_path, monkeypatch):
    root, rels = image_dir
    cache_dir = tmp_path / "cache"
    first = ImageCache.from_paths(root, rels, mode="disk", cache_dir=cache_dir, key="k1")
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".u8")
    assert not any(n.endswith(".tmp") for n in os.listdir(cache_dir))
    memory = ImageCache.from_paths(root, rels)
    for a, b in zip(first.get(range(12)), memory.get(range(12))):
        assert torch.equal(a, b)

    # A second build with the same sources must not decode anything.
    def boom(path):
        raise AssertionError(f"decoded {path} although the disk cache matches")

    monkeypatch.setattr(cache_mod, "decode_image", boom)
    again = ImageCache.from_paths(root, rels, mode="disk", cache_dir=cache_dir, key="k1")
    assert again.path == first.path and torch.equal(again.batch([1, 2]), first.batch([1, 2]))
    monkeypatch.undo()

    # A different key (e.g. another manifest) builds a separate cache beside it.
    other = ImageCache.from_paths(root, rels, mode="disk", cache_dir=cache_dir, key="k2")
    assert other.path != first.path and len(list(cache_dir.glob("*.u8"))) == 2


def test_cache_errors_name_the_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ImageDecodeError, match="bad.jpg"):
        ImageCache.from_paths(tmp_path, ["bad.jpg"])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        ImageCache.from_paths(tmp_path, ["missing.jpg"])
    with pytest.raises(ValueError, match="cache_dir"):
        ImageCache.from_paths(tmp_path, ["bad.jpg"], mode="disk")


# ------------------------------------------------------------------ transforms


def random_params(t: TrainTransform, n: int, seed: int) -> AugmentParams:
    t.generator.manual_seed(seed)
    return t.sample_params(n)


def test_train_transform_shapes_ranges_determinism():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 128, 64), dtype=torch.uint8, generator=g)
    a = TrainTransform(seed=7)(x)
    b = TrainTransform(seed=7)(x)
    c = TrainTransform(seed=8)(x)
    assert a.shape == (16, 3, 256, 128) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # without erasing, values stay in the normalised range of [0, 255]
    clean = TrainTransform(erase_p=0.0, seed=1)(x)
    assert clean.min() >= -1.0 and clean.max() <= 1.0


def test_train_params_follow_the_recipe():
    t = TrainTransform(seed=0)
    p = t.sample_params(4000)
    assert abs(p.flip.float().mean().item() - 0.5) < 0.04
    assert p.top.min() == 0 and p.top.max() == 20 and p.left.max() == 20
    assert abs(p.erase.float().mean().item() - 0.5) < 0.04
    er = p.box[p.erase]
    area = (er[:, 2] * er[:, 3]).double() / (256 * 128)
    assert area.min() > 0.015 and area.max() < 1 / 3 + 0.01
    aspect = er[:, 2].double() / er[:, 3].double()
    assert aspect.min() > 0.25 and aspect.max() < 3.6
    assert (er[:, 0] + er[:, 2] <= 256).all() and (er[:, 1] + er[:, 3] <= 128).all()
    assert (er[:, 2] < 256).all() and (er[:, 3] < 128).all()


@pytest.mark.parametrize("flip,top,left", [(False, 10, 10), (True, 10, 10), (False, 0, 20), (True, 20, 0), (True, 3, 17)])
def test_train_transform_matches_pil_reference_given_params(flip, top, left):
    arr = person_like(128, 64, 4)
    ours = TrainTransform(erase_p=0.0)
    params = ours.sample_params(1)
    params.flip[:] = flip
    params.top[:] = top
    params.left[:] = left
    got = ours.apply(to_chw(arr)[None], params)[0]
    ref = ReferenceTrainTransform().apply_fixed(Image.fromarray(arr), flip, top, left)
    # CPU uint8 resize is bit-identical to PIL; ToTensor+Normalize are the same float ops.
    assert torch.equal(got, ref)


def test_flip_pad_crop_loop_and_gather_agree():
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (32, 3, 40, 24), dtype=torch.uint8, generator=g)
    t = TrainTransform(size=(40, 24), pad=10, seed=3)
    p = t.sample_params(32)
    loop = flip_pad_crop(x, p.flip, p.top, p.left, 10, method="loop")
    gather = flip_pad_crop(x, p.flip, p.top, p.left, 10, method="gather")
    assert torch.equal(loop, gather)
    ident = flip_pad_crop(x, torch.zeros(32, dtype=torch.bool), torch.full((32,), 10), torch.full((32,), 10), 10)
    assert torch.equal(ident, x)
    for method in ("loop", "gather"):
        buf = torch.full(x.shape, 7.0)  # stale values must be overwritten, padding included
        flip_pad_crop(x, p.flip, p.top, p.left, 10, method=method, out=buf)
        assert torch.equal(buf, loop.float())


def test_erase_loop_and_masked_scatter_agree_and_out_buffer_reuse():
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (24, 3, 32, 16), dtype=torch.uint8, generator=g)
    t = TrainTransform(size=(64, 32), erase_p=0.7, seed=4)
    p = t.sample_params(24)
    base = t.apply(x, AugmentParams(p.flip, p.top, p.left, torch.zeros_like(p.erase), p.box, p.noise_seed))
    loop = t._erase(base.clone(), p, method="loop")
    masked = t._erase(base.clone(), p, method="gather")
    assert torch.equal(loop, masked) and not torch.equal(loop, base)
    fresh = t.apply(x, p)
    buf = torch.empty(24, 3, 64, 32)
    assert t.apply(x, p, out=buf) is buf and torch.equal(buf, fresh)
    with pytest.raises(ValueError, match="out must be float32"):
        t.apply(x, p, out=torch.empty(24, 3, 64, 32, dtype=torch.float64))


def test_random_erasing_only_touches_the_box_with_normal_noise():
    arr = person_like(128, 64, 1)
    x = to_chw(arr)[None].repeat(32, 1, 1, 1)
    t = TrainTransform(erase_p=1.0, seed=11)
    p = t.sample_params(32)
    assert p.erase.all()
    erased = t.apply(x, p)
    p_clean = AugmentParams(p.flip, p.top, p.left, torch.zeros_like(p.erase), p.box, p.noise_seed)
    clean = t.apply(x, p_clean)
    noise_vals = []
    for i in range(32):
        y0, x0, h, w = p.box[i].tolist()
        inside = torch.zeros(256, 128, dtype=torch.bool)
        inside[y0 : y0 + h, x0 : x0 + w] = True
        assert torch.equal(erased[i][:, ~inside], clean[i][:, ~inside])
        noise_vals.append(erased[i][:, inside].reshape(-1))
    noise = torch.cat(noise_vals)
    assert abs(noise.mean().item()) < 0.03 and abs(noise.std().item() - 1.0) < 0.03


def test_test_transform_matches_torchvision_reference():
    for i, (h, w) in enumerate([(128, 64), (300, 110), (256, 128)]):
        arr = person_like(h, w, i)
        for arch in ("vit", "resnet"):
            mean, std = normalization_for(arch)
            got = TestTransform((256, 128), mean, std)(to_chw(arr)[None])[0]
            ref = ReferenceTestTransform((256, 128), mean, std)(Image.fromarray(arr))
            # uint8 resize: identical to PIL when enlarging, within one grey level when shrinking.
            tol = 1e-6 if (h, w) != (300, 110) else 1.0001 / (255 * min(std))
            assert torch.allclose(got, ref, atol=tol), (h, w, arch)
    assert normalization_for("resnet") == (IMAGENET_MEAN, IMAGENET_STD)


def test_float_resize_path_matches_pil_within_one_level():
    # the path used on GPUs (no uint8 kernel there): two float passes with uint8 rounding between.
    for h, w in [(128, 64), (200, 90)]:
        arr = person_like(h, w, 9)
        ours = _resize_float_pil_like(to_chw(arr)[None], (256, 128), "bicubic")[0]
        pil = to_chw(np.asarray(Image.fromarray(arr).resize((128, 256), Image.BICUBIC)))
        assert (ours.int() - pil.int()).abs().max() <= 1


def test_resize_list_of_mixed_sizes_keeps_order(image_dir):
    root, rels = image_dir
    cache = ImageCache.from_paths(root, rels)
    imgs = cache.get([10, 0, 11, 1])
    out = resize_uint8(imgs, (64, 32))
    for i, im in enumerate(imgs):
        assert torch.equal(out[i], resize_uint8(im[None], (64, 32))[0])
    a = TrainTransform(size=(64, 32), seed=2)(imgs)
    assert a.shape == (4, 3, 64, 32)


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="flip_p"):
        TrainTransform(flip_p=1.5)
    with pytest.raises(ValueError, match="uint8"):
        resize_uint8(torch.zeros(1, 3, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="arch"):
        normalization_for("swin")


# ------------------------------------------------------------------ sampler


def make_pids():
    counts = {10: 9, 11: 4, 12: 2, 13: 1, 14: 6, 15: 5, 16: 8, 17: 3, 18: 4, 19: 7}
    pids = []
    for pid, n in counts.items():
        pids += [pid] * n
    perm = np.random.default_rng(0).permutation(len(pids))
    return np.asarray(pids)[perm], counts


def test_pk_sampler_batches_are_p_ids_times_k():
    pids, counts = make_pids()
    s = PKSampler(pids, p=4, k=4, seed=1)
    batches = list(s)
    assert batches, "no batches"
    for b in batches:
        assert len(b) == 16
        ids = [int(pids[i]) for i in b]
        per = Counter(ids)
        assert len(per) == 4 and set(per.values()) == {4}
        # each group of K is one identity (CLIP-ReID order)
        for g in range(4):
            assert len({ids[g * 4 + j] for j in range(4)}) == 1
    # CLIP-ReID's length estimate: Σ max(n, K) rounded down to K
    assert s.num_samples_estimate == sum(max(n, 4) - max(n, 4) % 4 for n in counts.values())
    assert len(s) == s.num_samples_estimate // 16 and len(batches) <= len(s)


def test_pk_sampler_replacement_and_no_repeats():
    pids, counts = make_pids()
    seen_small = Counter()
    for seed in range(20):
        for b in PKSampler(pids, p=4, k=4, seed=seed):
            for pid in set(int(pids[i]) for i in b):
                idxs = [i for i in b if int(pids[i]) == pid]
                assert all(int(pids[i]) == pid for i in idxs)
                if counts[pid] >= 4:
                    assert len(set(idxs)) == 4  # without replacement
                else:
                    seen_small[pid] += 1
    assert seen_small[13] > 0  # the single-image identity appears, its image repeated 4 times
    # images of an identity with >= K images are never used twice within one epoch
    for b_all in [sum(PKSampler(pids, p=2, k=4, seed=s), []) for s in range(5)]:
        big = [i for i in b_all if counts[int(pids[i])] >= 4]
        assert len(big) == len(set(big))


def test_pk_sampler_is_deterministic_and_resumable():
    pids, _ = make_pids()
    a = [list(PKSampler(pids, p=4, k=4, seed=3)) for _ in range(1)][0]
    b = list(PKSampler(pids, p=4, k=4, seed=3))
    c = list(PKSampler(pids, p=4, k=4, seed=4))
    assert a == b and a != c
    g = torch.Generator().manual_seed(9)
    s = PKSampler(pids, p=4, k=4, generator=g)
    list(s)
    state = g.get_state()
    epoch2 = list(s)
    g.set_state(state)
    assert list(s) == epoch2


def test_pk_sampler_needs_p_identities():
    with pytest.raises(ValueError, match="at least P=16 identities"):
        PKSampler([0, 0, 1, 1], p=16, k=4)
    with pytest.raises(ValueError, match="P and K"):
        PKSampler([0, 1], p=0, k=4)
