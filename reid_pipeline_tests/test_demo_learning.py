"""The demo, on the embedded data with the demo preset (the small CLIP pre-trained on captioned synthetic
people), shows each stage doing its job: a frozen baseline well above a random CLIP's, stage-1 prompts
that classify the training identities far above chance, a fine-tuned encoder far above the baseline,
re-ranking reported beside it.

The issue's goals are baseline mAP >= 0.30, prompt accuracy >= 0.8, fine-tuned mAP >= 0.80 and >= the
baseline + 0.30. Measured on one shared 2-core machine, one torch thread, three runs side by side (seeds =
the stage-1/stage-2 seeds: the preset's 0/1234, then 1/1235 and 2/1236; ``benchmarks/demo_recipes.py
--seed S``) on 320 training and 40 test identities, with the small CLIP pre-trained with orthogonal output
projections (session 14) and session 16's preset (stage 1 in batches of 256, stage 2 at lr 1e-3 for 40
epochs): baseline mAP 0.398 (the same for every stage seed: it depends on the pre-training only), prompt
accuracy 0.837-0.838 over 320 training identities (chance 1/320), fine-tuned mAP 0.826-0.837 (baseline
+ 0.43 to + 0.44), re-ranked 0.856-0.870. With two threads, as `make demo` runs (session 17,
another machine, one run after another): prompt accuracy 0.836-0.837, mAP 0.815-0.829, re-ranked 0.850-0.871;
seed 0 printed exactly what `make demo` printed (mAP 0.823). Asserted: the goals themselves, not one
machine's figures (another machine's floating-point kernels move them slightly; the README says so).
"""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from reid_pipeline_tests.conftest import PROJECT_ROOT

FLOORS = {"baseline_mAP": 0.30, "image_to_prompt_accuracy": 0.80, "mAP": 0.80, "margin": 0.30}


@pytest.mark.slow
def test_demo_learns_at_every_stage(tmp_path, monkeypatch):
    from reid_pipeline.definitions import defs

    data = PROJECT_ROOT / "data" / "embedded"
    if not (data / "synthetic").is_dir() or not (data / "tiny_clip_vit.pt.json").is_file():
        pytest.fail("embedded demo data or pre-trained CLIP missing: run `make embedded` (make test does)")
    monkeypatch.chdir(PROJECT_ROOT)  # the preset's paths are relative to the project root
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "demo.yaml").read_text())
    config["resources"]["reid"]["config"]["storage_dir"] = str(tmp_path / "artifacts")
    config["resources"]["device"]["config"]["device"] = "cpu"
    job = defs.resolve_job_def("reid_pipeline_job")
    selection = [dg.AssetKey(k) for k in ("dataset_manifest", "frozen_clip", "prompt_checkpoint", "visual_encoder",
                                          "reid_features", "evaluation_metrics")]
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(run_config={"resources": config["resources"], "ops": {
            k: v for k, v in config["ops"].items() if k in {s.path[0] for s in selection}}},
            instance=instance, asset_selection=selection, partition_key="synthetic")  # the demo's dataset
        assert result.success

        def meta(key: str) -> dict:
            (record,) = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=["synthetic"]), limit=1).records
            return record.asset_materialization.metadata

        stage1, metrics = meta("prompt_checkpoint"), meta("evaluation_metrics")
    value = {k: v.value for k, v in metrics.items() if hasattr(v, "value")}
    fine, frozen = value["mAP"], value["baseline_mAP"]
    report = {k: value.get(k) for k in ("mAP", "rank-1", "reranked_mAP", "baseline_mAP", "baseline_rank-1")}
    report["image_to_prompt_accuracy"] = stage1["image_to_prompt_accuracy"].value
    assert frozen >= FLOORS["baseline_mAP"], report  # the pre-trained backbone knows something
    assert report["image_to_prompt_accuracy"] >= FLOORS["image_to_prompt_accuracy"], report
    assert fine >= FLOORS["mAP"] and fine - frozen >= FLOORS["margin"], report
    assert value["rank-1"] > value["baseline_rank-1"], report
    assert 0.0 < value["reranked_mAP"] <= 1.0, report  # re-ranking reported beside it
