"""Which datasets a deployment keeps side by side (reid_pipeline.datasets): names, roots and clear errors."""

from __future__ import annotations

import pytest

from reid_pipeline.datasets import EMBEDDED_DATASETS, dataset_name, datasets_from_env, parse_datasets


def test_inline_items_name_roots_or_take_the_folder_name():
    assert parse_datasets("market1501=/data/Market-1501, /data/DukeMTMC-reID") == {
        "market1501": "/data/Market-1501", "dukemtmc-reid": "/data/DukeMTMC-reID"}
    assert dataset_name("/data/Market-1501-v15.09.15/") == "market-1501-v15.09.15"
    assert dataset_name("~/my data/MSMT17_V1") == "msmt17_v1"


def test_yaml_file_at_top_level_or_under_datasets(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("market1501: /data/m\nduke:\n  root: /data/d\n")
    nested = tmp_path / "nested.yml"
    nested.write_text("datasets:\n  msmt17: /data/s\n")
    assert parse_datasets(str(flat)) == {"market1501": "/data/m", "duke": "/data/d"}
    assert parse_datasets(str(nested)) == {"msmt17": "/data/s"}


@pytest.mark.parametrize("spec, message", [
    ("", "is empty"),
    ("Market=/data/m", "dataset name 'Market'"),
    ("a=/x,a=/y", "named twice"),
    ("a=", "expected a root folder"),
    ("missing.yaml", "does not exist"),
    ("/", "cannot name a dataset after it"),
])
def test_bad_specs_name_the_item(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_datasets(spec)


def test_bad_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="bad.yaml.*expected a mapping"):
        parse_datasets(str(bad))


def test_env_precedence():
    assert datasets_from_env({}) == EMBEDDED_DATASETS
    assert datasets_from_env({"REID_DATA_ROOT": "/data/Market-1501"}) == {"market-1501": "/data/Market-1501"}
    assert datasets_from_env({"REID_DATASETS": "a=/x", "REID_DATA_ROOT": "/data/m"}) == {"a": "/x"}
