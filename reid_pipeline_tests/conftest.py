"""Shared fixtures: the small CLIP in OpenAI's format, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory) -> Path:
    """The small ViT CLIP saved as a TorchScript archive (what ``clip.load`` reads)."""
    from reid_pipeline.embedded.tiny_clip import ensure_tiny_clip

    return ensure_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip_vit.pt", arch="vit", seed=0)


@pytest.fixture(scope="session")
def tiny_rn_clip_path(tmp_path_factory) -> Path:
    from reid_pipeline.embedded.tiny_clip import ensure_tiny_clip

    return ensure_tiny_clip(tmp_path_factory.mktemp("clip_rn") / "tiny_clip_rn.pt", arch="resnet", seed=0)


@pytest.fixture()
def torch_one_thread():
    """The tiny CLIP's ops are too small to gain from threads; on a busy 2-core CPU a second OpenMP
    thread makes them about ten times slower. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip_model():
    """A fresh small ViT CLIP (not loaded from disk) per test module."""
    from reid_pipeline.embedded.tiny_clip import build_tiny_clip

    return build_tiny_clip("vit", seed=0)


@pytest.fixture()
def dagster_home(tmp_path, monkeypatch) -> Path:
    """A throwaway DAGSTER_HOME with the project's dagster.yaml."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((PROJECT_ROOT / "dagster_home" / "dagster.yaml").read_text())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    from reid_pipeline.operations import init_instance

    init_instance(home)  # as `make setup` does for dagster_home/: schema and pool limits, once
    return home


def cli_env(dagster_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DAGSTER_HOME"] = str(dagster_home)
    env.pop("REID_DATA_ROOT", None)
    env.pop("REID_DATASETS", None)
    env.pop("REID_CLIP_WEIGHTS", None)
    return env
