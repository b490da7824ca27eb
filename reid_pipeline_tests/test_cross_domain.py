"""Cross-domain evaluation: every dataset's encoder on every dataset's query × gallery.

The matrix is checked against the single-dataset path (features_step → metrics_step) cell by cell, and
the ``cross_domain_metrics`` asset against two dataset partitions, one of them without an encoder yet.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
import torch

from reid_pipeline.artifacts import ClipRef, EncoderArtifact, load_descriptor
from reid_pipeline.assets.evaluation import cross_domain_metrics
from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.synthetic import generate_synthetic_dataset
from reid_pipeline.model.clip_loader import load_clip
from reid_pipeline.model.reid_model import ReIDModel, save_reid_model
from reid_pipeline.partitions import dataset_partitions
from reid_pipeline.pipeline import EvaluationSettings, cross_domain_step, features_step, manifest_step, metrics_step
from reid_pipeline.resources import ArtifactIOManager, ReidSettings, TrainingDevice

A, B = "synthetic", "synthetic-ci"  # the default dataset partitions
INPUT = (128, 64)


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory, tiny_clip_path) -> dict:
    base = tmp_path_factory.mktemp("domains")
    torch.manual_seed(0)
    manifests, encoders = {}, {}
    for i, (name, cameras) in enumerate(((A, 3), (B, 2))):
        root = base / name
        generate_synthetic_dataset(root, num_ids=6, images_per_id=4, num_cameras=cameras, seed=20 + i)
        out = base / f"manifest-{name}"
        out.mkdir()
        manifests[name] = manifest_step(root, out, dataset=name)[0]
        clip_model, info = load_clip(tiny_clip_path, input_size=INPUT)
        model = ReIDModel(clip_model, manifests[name].num_classes, seed=i)
        with torch.no_grad():  # two different encoders, as two trainings would give
            gen = torch.Generator().manual_seed(i)
            for p in model.visual.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02 * i)
        ref = ClipRef(source=info.source, name=info.name, sha256=info.sha256, arch=info.arch, input_size=info.input_size,
                      stride=info.stride, version="test")
        folder = base / f"encoder-{name}"
        folder.mkdir()
        weights = save_reid_model(folder / "visual_encoder.safetensors", model,
                                  {"clip": ref.model_dump(mode="json"), "precision": "fp32"})
        encoders[name] = EncoderArtifact(artifact_dir=str(folder), weights=str(weights),
                                         num_classes=manifests[name].num_classes, label_to_pid=manifests[name].label_to_pid,
                                         sie_camera=False, clip=ref, manifest_fingerprint=manifests[name].fingerprint,
                                         prompt_tokens="none", precision="fp32")
    return {"manifests": manifests, "encoders": encoders, "base": base}


def test_matrix_matches_the_single_dataset_evaluation(two_domains, tmp_path):
    spec = resolve_device("cpu", "fp32")
    manifests, encoders = two_domains["manifests"], two_domains["encoders"]
    artifact, report = cross_domain_step(encoders, manifests, spec, tmp_path, cache_dir=tmp_path / "cache", batch_size=8)
    assert artifact.train_datasets == artifact.test_datasets == [A, B]
    assert len(report.table) == 4 and report.table.in_domain.sum() == 2
    for r, train in enumerate((A, B)):
        for c, test in enumerate((A, B)):
            out = tmp_path / f"{train}-{test}"
            out.mkdir()
            features = features_step(manifests[test], encoders[train], spec, out, cache_dir=tmp_path / "cache", batch_size=8)
            metrics, _ = metrics_step(features, EvaluationSettings(rerank=False, rank_list_queries=1), out)
            assert artifact.mAP[r][c] == pytest.approx(metrics.metrics["mAP"], abs=1e-6), (train, test)
            assert artifact.rank1[r][c] == pytest.approx(metrics.metrics["rank-1"], abs=1e-6), (train, test)
    assert artifact.mAP[0] != artifact.mAP[1]  # two encoders, two rows
    saved = json.loads(Path(artifact.matrix_file).read_text())
    assert saved["mAP"] == artifact.mAP and saved["train"] == [A, B] and len(saved["pairs"]) == 4
    assert report.heatmap_png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one encoder"):
        cross_domain_step({}, manifests, spec, tmp_path, cache_dir=tmp_path / "cache")


def test_asset_reads_every_dataset_partition(two_domains, tmp_path):
    manifests, encoders = two_domains["manifests"], two_domains["encoders"]

    @dg.asset(name="dataset_manifest", partitions_def=dataset_partitions)
    def manifest_stub(context):
        return manifests[context.partition_key]

    @dg.asset(name="visual_encoder", partitions_def=dataset_partitions)
    def encoder_stub(context):
        return encoders[context.partition_key]

    resources = {"reid": ReidSettings(storage_dir=str(tmp_path / "store")), "device": TrainingDevice(device="cpu"),
                 "io_manager": ArtifactIOManager()}
    assets = [manifest_stub, encoder_stub, cross_domain_metrics]
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure, match="no dataset has a trained visual_encoder"):
            dg.materialize(assets, selection=[cross_domain_metrics], instance=instance, resources=resources)
        dg.materialize(assets, selection=[manifest_stub], instance=instance, resources=resources, partition_key=B)
        dg.materialize(assets, selection=[manifest_stub, encoder_stub], instance=instance, resources=resources,
                       partition_key=A)
        # A has an encoder, B only a dataset: one row, two columns
        result = dg.materialize(assets, selection=[cross_domain_metrics], instance=instance, resources=resources,
                                run_config={"ops": {"cross_domain_metrics": {"config": {"batch_size": 8}}}})
        (mat,) = result.asset_materializations_for_node("cross_domain_metrics")
        meta = mat.metadata
        assert meta["datasets_without_encoder"].value == [B]
        artifact = load_descriptor(meta["descriptor"].value)
        assert artifact.train_datasets == [A] and artifact.test_datasets == [A, B]
        assert meta["mAP_matrix"].value.count("\n") == 2  # header, rule, one row
        assert "data:image/png;base64," in meta["heatmap"].value
        # its own folder, not a dataset's
        assert Path(artifact.artifact_dir).parent.name == "cross_domain_metrics"
        rows = {(r.data["train"], r.data["test"]): r.data for r in meta["pairs"].value.records}
        assert set(rows) == {(A, A), (A, B)}
        assert rows[(A, A)]["mAP"] == pytest.approx(meta["mean_in_domain_mAP"].value)
        assert rows[(A, B)]["mAP"] == pytest.approx(meta["mean_cross_domain_mAP"].value)


def test_heatmap_refuses_a_matrix_of_the_wrong_shape_or_range():
    from reid_pipeline.evaluation.plots import plot_cross_domain

    assert plot_cross_domain({"mAP": [[0.5, 0.1]]}, ["a"], ["a", "b"])[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"shape \(2, 1\), expected \(1, 2\)"):
        plot_cross_domain({"mAP": [[0.5], [0.1]]}, ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        plot_cross_domain({"mAP": [[1.5, 0.1]]}, ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="at least one matrix"):
        plot_cross_domain({}, ["a"], ["a"])
