"""On the embedded demo data with the demo preset, stage 2 must buy a wide margin over the frozen CLIP."""

from __future__ import annotations

import dagster as dg
import pytest
import yaml

from reid_pipeline_tests.conftest import PROJECT_ROOT


@pytest.mark.slow
def test_fine_tuned_encoder_beats_frozen_by_a_wide_margin(tmp_path, monkeypatch):
    from reid_pipeline.definitions import defs

    data = PROJECT_ROOT / "data" / "embedded"
    if not (data / "synthetic").is_dir():
        pytest.fail("embedded demo data missing: run `make embedded` (make test does)")
    monkeypatch.chdir(PROJECT_ROOT)  # the preset's paths are relative to the project root
    config = yaml.safe_load((PROJECT_ROOT / "configs" / "demo.yaml").read_text())
    config["resources"]["reid"]["config"]["storage_dir"] = str(tmp_path / "artifacts")
    config["resources"]["device"]["config"]["device"] = "cpu"
    job = defs.get_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(run_config=config, instance=instance)
        assert result.success
        meta = instance.get_latest_materialization_event(dg.AssetKey("evaluation_metrics")).asset_materialization.metadata
    fine, frozen = meta["mAP"].value, meta["baseline_mAP"].value
    assert fine >= 2.5 * frozen and fine - frozen >= 0.04, (fine, frozen)
    assert meta["rank-1"].value > meta["baseline_rank-1"].value
    assert meta["reranked_mAP"].value > frozen
