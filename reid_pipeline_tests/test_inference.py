"""reid_pipeline.inference: extraction = the evaluation's features, search = the evaluation's ranking,
index round trip and refusals, unreadable images, faiss recall, ONNX parity, resumable indexing and
every ``reid-search`` subcommand through a subprocess."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reid_pipeline.artifacts import ClipRef, EncoderArtifact
from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.device import resolve_device
from reid_pipeline.evaluation import evaluate_rank, normalize, pairwise_distance, re_ranking
from reid_pipeline.inference import (
    EmptyIndexError,
    EncoderMismatchError,
    FeatureDimensionError,
    GalleryIndex,
    ReIDPredictor,
    UnreadableImagesError,
    build_gallery_index,
    export_onnx,
    labels_from_names,
    list_images,
)
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.model.reid_model import ReIDModel, load_reid_model, save_reid_model
from reid_pipeline.storage import CheckpointError
from reid_pipeline.training.extract import extract_features
from reid_pipeline_tests.conftest import PROJECT_ROOT

EMBEDDED = PROJECT_ROOT / "data" / "embedded"
BATCH = 16
REID_SEARCH = str(Path(sys.executable).with_name("reid-search"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ci_data(tmp_path_factory) -> Path:
    """data/embedded/synthetic-ci (built by `make embedded`), else the same generator into a temp folder."""
    if (EMBEDDED / "synthetic-ci").is_dir():
        return EMBEDDED / "synthetic-ci"
    from reid_pipeline.embedded.synthetic import generate_synthetic_dataset

    out = tmp_path_factory.mktemp("data") / "synthetic-ci"
    generate_synthetic_dataset(out, num_ids=24, images_per_id=6, seed=1)
    return out


def _write_encoder(folder: Path, clip_path: Path, model: ReIDModel, info) -> Path:
    ref = ClipRef(source=info.source, name=info.name, sha256=info.sha256, arch=info.arch,
                  input_size=info.input_size, stride=info.stride, version="test")
    weights = save_reid_model(folder / "visual_encoder.safetensors", model,
                              {"clip": ref.model_dump(mode="json"), "precision": "fp32", "label_to_pid": [0, 1, 2, 3]})
    EncoderArtifact(artifact_dir=str(folder), weights=str(weights), num_classes=4, label_to_pid=[0, 1, 2, 3],
                    sie_camera=model.num_cameras > 0, clip=ref, manifest_fingerprint="test", prompt_tokens="none",
                    precision="fp32").save()
    return weights


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, tiny_clip_path) -> dict:
    """An encoder artefact (descriptor.json + visual_encoder.safetensors/.json) around the embedded small CLIP."""
    clip_path = EMBEDDED / "tiny_clip_vit.pt" if (EMBEDDED / "tiny_clip_vit.pt").is_file() else tiny_clip_path
    clip_model, info = load_clip(clip_path, input_size=(256, 128))
    model = ReIDModel(clip_model, 4, seed=0)
    with torch.no_grad():  # move away from the CLIP initialisation, as fine-tuning would
        gen = torch.Generator().manual_seed(3)
        for p in model.visual.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    folder = tmp_path_factory.mktemp("encoder")
    weights = _write_encoder(folder, clip_path, model, info)
    return {"folder": folder, "weights": weights, "clip_path": clip_path}


@pytest.fixture(scope="module")
def predictor(encoder) -> ReIDPredictor:
    return ReIDPredictor.load(encoder["folder"], device="cpu", batch_size=BATCH)


@pytest.fixture(scope="module")
def splits(ci_data) -> dict:
    out = {}
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        paths = list_images(ci_data / folder)
        pids, cams = labels_from_names(paths)
        out[split] = {"paths": paths, "pids": pids, "cams": cams, "rel": [p.relative_to(ci_data).as_posix() for p in paths]}
    return out


@pytest.fixture(scope="module")
def reference(encoder, splits, ci_data) -> dict:
    """What the reid_features asset computes: load_reid_model + extract_features + TestTransform over an ImageCache."""
    clip_model, info = load_clip(encoder["clip_path"], input_size=(256, 128))
    model, _ = load_reid_model(encoder["weights"], clip_model)
    transform = TestTransform(info.input_size, *normalization_for(info.arch))
    spec = resolve_device("cpu", "fp32")
    feats = {}
    for split in ("query", "gallery"):
        cache = ImageCache.from_paths(ci_data, splits[split]["rel"])
        feats[split] = extract_features(model, cache, None, transform, spec, BATCH)
    return {"model": model, "transform": transform, "spec": spec, **feats}


def test_load_accepts_folder_and_safetensors(encoder, predictor):
    other = ReIDPredictor.load(encoder["weights"], device="cpu")
    assert other.fingerprint == predictor.fingerprint
    # the test-time feature: the encoder's CLS feature and its projection, concatenated (BNNeck outputs)
    assert predictor.feature_dim == predictor.model.test_dim and predictor.backend == "torch"
    assert predictor.feature_dim == predictor.model.visual.proj.shape[0] + predictor.model.proj_dim
    assert predictor.describe()["clip"]["sha256"]


def test_extract_is_bitwise_the_evaluation_features(predictor, reference, splits):
    got = predictor.extract(splits["gallery"]["paths"])
    assert torch.equal(got, normalize(reference["gallery"]))
    assert torch.allclose(got.norm(dim=1), torch.ones(len(got)), atol=1e-6)


def test_extract_takes_pil_arrays_and_tensors_of_any_size(predictor, reference, splits):
    paths = splits["gallery"]["paths"][:6]
    pil = [Image.open(p).convert("RGB") for p in paths]
    sizes = [(64, 128), (100, 200), (48, 90), (64, 128), (130, 260), (33, 70)]
    imgs = [im.resize(s) for im, s in zip(pil, sizes)]
    arrays = [np.asarray(im) for im in imgs]
    tensors = [torch.from_numpy(a.transpose(2, 0, 1).copy()) for a in arrays]
    floats = [t.float() / 255.0 for t in tensors]
    expected = normalize(extract_features(reference["model"], ImageCache.from_tensors(tensors), None,
                                          reference["transform"], reference["spec"], BATCH))
    for inputs in (imgs, arrays, tensors, floats):
        assert torch.equal(predictor.extract(inputs), expected)
    assert predictor.extract(paths[0]).shape == (1, predictor.feature_dim)
    with pytest.raises(UnreadableImagesError, match="expected uint8"):
        predictor.extract([arrays[0].astype(np.float32)])


def test_unreadable_images_are_named_and_the_rest_go_on(predictor, splits, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = [shutil.copy(p, folder / p.name) for p in splits["gallery"]["paths"][:3]]
    truncated = folder / "0001_c1s1_000001_01.jpg"
    truncated.write_bytes(Path(splits["gallery"]["paths"][3]).read_bytes()[:200])
    text = folder / "0002_c2s1_000001_01.jpg"
    text.write_text("not an image")
    items = [good[0], truncated, good[1], text, good[2]]
    with pytest.raises(UnreadableImagesError) as err:
        predictor.extract(items)
    assert str(truncated) in str(err.value) and str(text) in str(err.value)
    report = predictor.extract_report(items)
    assert report.indices == [0, 2, 4] and [f.name for f in report.failures] == [str(truncated), str(text)]
    assert torch.equal(report.features, predictor.extract([good[0], good[1], good[2]]))
    index = GalleryIndex.build(predictor, items)
    assert len(index) == 3 and [s["name"] for s in index.skipped] == [str(truncated), str(text)]


def _stable_topk(dist: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def test_search_is_the_ranking_evaluate_rank_sees(predictor, reference, splits):
    g_raw = torch.cat([reference["gallery"], reference["gallery"][:5]])  # duplicates: exact ties
    g_paths = [str(p) for p in splits["gallery"]["paths"]] + [f"dup{i}" for i in range(5)]
    g_pids = np.concatenate([splits["gallery"]["pids"], splits["gallery"]["pids"][:5]])
    g_cams = np.concatenate([splits["gallery"]["cams"], splits["gallery"]["cams"][:5]])
    q_raw = reference["query"]
    dist = pairwise_distance(q_raw, g_raw)
    index = GalleryIndex.from_features(normalize(g_raw), g_paths, g_pids, g_cams, fingerprint=predictor.fingerprint)
    queries = predictor.extract(splits["query"]["paths"])
    assert torch.equal(queries, normalize(q_raw))
    expected = _stable_topk(dist.numpy(), 10)
    results = index.search(queries, k=10)  # the gallery fits one chunk: bit for bit
    assert np.array_equal(np.array([r.indices for r in results]), expected)
    got_d = np.array([r.distances for r in results], dtype=np.float32)
    assert np.array_equal(got_d, np.take_along_axis(dist.numpy(), expected, axis=1))
    # in 64-row chunks (here 64 + 2) the edge chunk's GEMM may round differently: within an ulp
    chunked = index.search(queries, k=10, chunk_size=7)
    c_idx = np.array([r.indices for r in chunked])
    c_d = np.array([r.distances for r in chunked], dtype=np.float32)
    assert np.allclose(c_d, np.take_along_axis(dist.numpy(), c_idx, axis=1), rtol=0, atol=1e-6)
    assert np.allclose(c_d, got_d, rtol=0, atol=1e-6) and (np.diff(c_d, axis=1) >= 0).all()
    # the ties between an item and its duplicate come out lower index first
    r0 = index.search(queries[:1], k=len(index))[0]
    assert r0.indices.index(0) < r0.indices.index(61)
    # the full matrix the index computes is the evaluation's, hence the same metrics
    assert torch.equal(index.distances(queries), dist)
    q_pids, q_cams = splits["query"]["pids"], splits["query"]["cams"]
    a = evaluate_rank(index.distances(queries), q_pids, g_pids, q_cams, g_cams)
    b = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    assert a["mAP"] == b["mAP"] and np.array_equal(a["cmc"], b["cmc"])
    assert results[0].ids == [int(g_pids[i]) for i in expected[0]]
    # re-ranking: the evaluation's re_ranking(query, gallery), same tie order
    rr = re_ranking(q_raw, g_raw)
    reranked = index.search(queries, k=10, rerank=True)
    assert np.array_equal(np.array([r.indices for r in reranked]), _stable_topk(rr, 10))


def test_index_save_load_round_trip_and_refusals(predictor, splits, tmp_path, encoder):
    gallery = splits["gallery"]
    index = GalleryIndex.build(predictor, gallery["paths"], gallery["pids"], gallery["cams"])
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx", predictor)
    assert torch.equal(loaded.features, index.features) and loaded.paths == index.paths
    assert np.array_equal(loaded.ids, gallery["pids"]) and np.array_equal(loaded.camids, gallery["cams"])
    q = splits["query"]["paths"][:3]
    assert [r.indices for r in loaded.search(q, k=5)] == [r.indices for r in index.search(q, k=5)]
    # another encoder (the same architecture, other weights) is refused
    changed = copy.deepcopy(predictor.model)
    with torch.no_grad():
        changed.visual.proj.mul_(1.01)
    other = ReIDPredictor.from_model(changed, device="cpu")
    with pytest.raises(EncoderMismatchError, match="rebuild the index"):
        GalleryIndex.load(tmp_path / "idx", other)
    with pytest.raises(EncoderMismatchError):
        index.add(other, q)
    with pytest.raises(FeatureDimensionError, match=f"{predictor.feature_dim}-d"):
        loaded.search(torch.randn(2, 100), k=3)
    with pytest.raises(EmptyIndexError):
        GalleryIndex.for_predictor(predictor).search(q, k=3)
    with pytest.raises(CheckpointError, match="no gallery index"):
        GalleryIndex.load(tmp_path / "nowhere")
    # add() appends; k beyond the gallery is clamped
    loaded.add(predictor, q, [1, 2, 3], [0, 0, 0])
    assert len(loaded) == len(index) + 3 and len(loaded.search(q[:1], k=10_000)[0].indices) == len(loaded)


def test_faiss_recall_is_measured_against_exact():
    gen = torch.Generator().manual_seed(0)
    ids, per_id, dim = 2000, 8, 64
    centers = normalize(torch.randn(ids, dim, generator=gen))
    feats = normalize(centers.repeat_interleave(per_id, 0) + 0.35 * torch.randn(ids * per_id, dim, generator=gen) / dim**0.5)
    index = GalleryIndex.from_features(feats, fingerprint="synthetic")
    report = index.build_ann(target_recall=0.95, k=10, sample_queries=200, num_threads=1)
    assert report["recall_at_k"] >= 0.95 and report["nprobe"] <= report["nlist"]
    assert report["curve"][-1][1] == report["recall_at_k"]
    queries = normalize(centers[:50] + 0.35 * torch.randn(50, dim, generator=gen) / dim**0.5)
    exact = index.search(queries, k=10)
    approx = index.search(queries, k=10, backend="faiss")
    hits = sum(len(set(a.indices) & set(e.indices)) for a, e in zip(approx, exact))
    assert hits / 500 >= 0.9
    with pytest.raises(ValueError, match="exact"):
        index.search(queries, k=10, backend="faiss", rerank=True)


def test_onnx_export_matches_pytorch(predictor, splits, tmp_path):
    gallery, queries = splits["gallery"]["paths"], splits["query"]["paths"]
    report = export_onnx(predictor, tmp_path / "encoder.onnx", gallery_images=gallery, query_images=queries)
    assert report["passed"] and report["max_abs_diff"] <= 1e-4 and report["top_k_identical_up_to_ties"]
    assert report["tie_tolerance"] < 1e-5 and report["max_rank_distance_gap"] <= report["tie_tolerance"]
    assert report["check_batch_size"] < report["check_images"]  # a full and a partial batch: dynamic axis
    sidecar = json.loads((tmp_path / "encoder.json").read_text())
    assert sidecar["opset"] == report["opset"] and sidecar["fingerprint"] == predictor.fingerprint
    onnx_pred = ReIDPredictor.load(tmp_path / "encoder.onnx", batch_size=7)
    assert onnx_pred.backend == "onnx" and onnx_pred.fingerprint == predictor.fingerprint
    diff = (onnx_pred.extract(queries) - predictor.extract(queries)).abs().max()
    assert float(diff) <= 1e-4
    index = GalleryIndex.build(predictor, gallery)
    index.attach(onnx_pred)  # same encoder: an index built with PyTorch serves ONNX queries
    a = [r.indices for r in index.search(queries, k=10)]
    index.attach(predictor)
    assert a == [r.indices for r in index.search(queries, k=10)]


def test_build_gallery_index_resumes_after_an_interruption(predictor, splits, tmp_path):
    paths = splits["gallery"]["paths"][:40]
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if done >= 32:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_gallery_index(predictor, paths, tmp_path / "idx", shard_size=16, progress=interrupt)
    assert len(list((tmp_path / "idx" / "shards").glob("*.safetensors"))) == 1
    logs = []
    index = build_gallery_index(predictor, paths, tmp_path / "idx", shard_size=16, log=logs.append)
    assert any("resumed shard 1/3" in m for m in logs)
    assert not (tmp_path / "idx" / "shards").exists()
    assert torch.equal(index.features, predictor.extract(paths))
    again = build_gallery_index(predictor, paths, tmp_path / "idx", shard_size=16, log=logs.append)
    assert "already complete" in logs[-1] and torch.equal(again.features, index.features)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([REID_SEARCH, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_cli_index_query_export(encoder, ci_data, splits, tmp_path):
    gallery_dir = tmp_path / "gallery"
    shutil.copytree(ci_data / "bounding_box_test", gallery_dir)
    (gallery_dir / "0003_c1s1_000001_01.jpg").write_bytes(b"\xff\xd8\xff broken")
    out = tmp_path / "index"
    proc = _cli("index", "--model", encoder["folder"], "--images", gallery_dir, "--out", out,
                "--device", "cpu", "--shard-size", "32")
    assert proc.returncode == 3, proc.stderr[-3000:]  # 3: written, but an image was unreadable
    assert "0003_c1s1_000001_01.jpg" in proc.stderr and "index [" in proc.stderr
    assert f"{len(splits['gallery']['paths'])} images" in proc.stdout

    queries = [str(p) for p in splits["query"]["paths"][:2]]
    missing = str(tmp_path / "missing.jpg")
    png = tmp_path / "ranked.png"
    proc = _cli("query", "--index", out, *queries, missing, "--top-k", "5", "--rerank", "--json", "--png", png,
                "--device", "cpu")
    assert proc.returncode == 3, proc.stderr[-3000:]  # 3: answered, but a query image was missing
    assert "missing.jpg" in proc.stderr
    doc = json.loads(proc.stdout)
    assert [q["query"] for q in doc["queries"]] == queries and doc["unreadable"] == [missing]
    assert all(len(q["results"]) == 5 and q["results"][0]["id"] is not None for q in doc["queries"])
    with Image.open(png) as im:
        assert im.width > 5 * 64 and im.height > 2 * 128
    index = GalleryIndex.load(out)
    feats = ReIDPredictor.load(encoder["folder"], device="cpu").extract(queries)
    assert [r["path"] for r in doc["queries"][0]["results"]] == index.search(feats, k=5, rerank=True)[0].paths

    onnx_path = tmp_path / "encoder.onnx"
    proc = _cli("export", "--model", encoder["folder"], "--out", onnx_path, "--images", ci_data / "bounding_box_test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert onnx_path.is_file() and "top-10 identical" in proc.stdout and "opset" in proc.stdout
    # the exported encoder answers queries against the PyTorch-built index (same fingerprint), as a table
    proc = _cli("query", "--index", out, queries[0], "--model", onnx_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"query {queries[0]}") and len(proc.stdout.splitlines()) == 11


def test_sie_encoder_takes_camera_ids_in_pytorch_and_onnx(encoder, splits, tmp_path):
    clip_model, _ = load_clip(encoder["clip_path"], input_size=(256, 128))
    sie = ReIDPredictor.from_model(ReIDModel(clip_model, 4, num_cameras=6, seed=1), device="cpu")
    paths = splits["gallery"]["paths"][:6]
    cams = splits["gallery"]["cams"][:6]
    with pytest.raises(ValueError, match="camids"):
        sie.extract(paths)
    with pytest.raises(ValueError, match="out of range"):
        sie.extract(paths, camids=[9] * 6)
    feats = sie.extract(paths, camids=cams)
    assert not torch.equal(feats, sie.extract(paths, camids=np.zeros(6, dtype=np.int64)))
    report = export_onnx(sie, tmp_path / "sie.onnx", check_images=paths)
    assert report["passed"]
    onnx_sie = ReIDPredictor.load(tmp_path / "sie.onnx")
    assert onnx_sie.num_cameras == 6
    assert float((onnx_sie.extract(paths, camids=cams) - feats).abs().max()) <= 1e-4
