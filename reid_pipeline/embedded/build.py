"""Build the embedded default (synthetic data + small CLIP) under ``data/embedded`` when absent.

``python -m reid_pipeline.embedded [--root data/embedded]`` — idempotent and deterministic: each item
is generated into a temporary folder and moved into place, so an interrupted build is redone.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from reid_pipeline.data.synthetic import generate_synthetic_dataset
from reid_pipeline.model.clip_loader import ensure_tiny_clip

DATASETS = {
    # name: generator arguments. "synthetic" is the demo; "synthetic-ci" the CI preset.
    "synthetic": dict(num_ids=80, images_per_id=8, seed=0),
    "synthetic-ci": dict(num_ids=24, images_per_id=6, seed=1),
}
CLIP_FILE = "tiny_clip_vit.pt"


def ensure_dataset(root: Path, name: str, **kwargs) -> Path:
    target = root / name
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        generate_synthetic_dataset(tmp / name, **kwargs)
        (tmp / name).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_embedded(root: str | Path = "data/embedded") -> dict[str, Path]:
    root = Path(root)
    built = {name: ensure_dataset(root, name, **kw) for name, kw in DATASETS.items()}
    built["clip"] = ensure_tiny_clip(root / CLIP_FILE, arch="vit", seed=0)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="data/embedded", help="where to build (default data/embedded)")
    args = parser.parse_args(argv)
    for name, path in build_embedded(args.root).items():
        print(f"embedded {name}: {path}")


if __name__ == "__main__":
    main()
