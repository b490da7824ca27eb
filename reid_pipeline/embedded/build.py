"""Build the embedded default under ``data/embedded`` when absent.

* ``synthetic`` (the demo) and ``synthetic-ci`` (the CI preset): synthetic Market-1501-style datasets;
* ``pretrain-captions``: captioned synthetic people whose identities are disjoint from both (another
  seed, other cameras), the pre-training data of the small CLIP;
* ``tiny_clip_vit.pt``: the small CLIP (:func:`.tiny_clip.build_tiny_clip`) pre-trained contrastively on
  ``pretrain-captions`` (:func:`reid_pipeline.training.clip_pretrain.pretrain_clip_folder`), saved in
  OpenAI's TorchScript format, which ``clip.load(path)`` reads; its run summary is in ``….pt.json``.

``python -m reid_pipeline.embedded [--root data/embedded]`` — idempotent and deterministic: a dataset
is regenerated only when its ``synthetic.json`` does not match the arguments, the CLIP only when it is
absent or its sidecar records another pre-training recipe (configuration, data arguments or
captions). Every item is written to a temporary file or
folder and moved into place, so an interrupted build is redone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from reid_pipeline.device import resolve_device
from reid_pipeline.embedded.synthetic import CAPTIONS_FILE, generate_synthetic_dataset
from reid_pipeline.embedded.tiny_clip import build_tiny_clip
from reid_pipeline.storage import file_sha256, read_json
from reid_pipeline.training.clip_pretrain import PretrainConfig, pretrain_clip_folder

__all__ = [
    "CLIP_FILE",
    "DATASETS",
    "PRETRAIN_CONFIG",
    "PRETRAIN_DATASET",
    "build_embedded",
    "ensure_dataset",
    "ensure_pretrained_clip",
    "main",
]

DATASETS: dict[str, dict[str, Any]] = {
    # name: generator arguments. "synthetic" is the demo; "synthetic-ci" the CI preset.
    # The demo trains on 320 people and tests on 40. Stage 2 learns to tell apart people it has never
    # seen from how many people it has seen: with 40 training people (the generator's default halves) it
    # saturated near fine-tuned mAP 0.49, with 160 the same number of steps reached 0.67-0.69 (twice as
    # many 0.73-0.75), with 320 the same steps 0.80 and 1.5 times as many (the preset) 0.82-0.84 (3 seeds)
    # (benchmarks/demo_recipes.py). The gallery stays small; more training people cost drawing time only.
    "synthetic": {"num_ids": 360, "num_test_ids": 40, "images_per_id": 8, "seed": 0},
    "synthetic-ci": {"num_ids": 24, "images_per_id": 6, "seed": 1},
}
#: people never seen in the demo or CI sets (their own seed: other appearances and other cameras).
#: Many people with few images each: a P×K batch holds 4 images of a person whatever their number, so
#: 800 × 4 costs what 400 × 8 did and shows twice as many appearances (the demo's baseline mAP rose
#: from 0.29 to 0.32 with it, prompt accuracy from 0.64 to 0.77: seed 0, pre-training lr 1e-3, stage 1 300 epochs).
PRETRAIN_DATASET: tuple[str, dict[str, Any]] = (
    "pretrain-captions",
    {"num_ids": 800, "images_per_id": 4, "num_cameras": 9, "seed": 1000, "num_distractors": 0, "num_junk": 0},
)
# measured (2 busy CPU cores, one thread): ~3 min, zero-shot image→caption top-1 0.44 on 80 held-out people
# (chance 0.013); raw feature lengths calibrated to sqrt(logit scale) (see clip_pretrain). lr 5e-4: with 1e-3 the
# top-1 was 0.41 and the demo's baseline mAP 0.32 (0.33 now), with 2e-3 0.16; batch 128 gave 0.39.
# Orthogonal output projections and a temperature learning at 0.05 (session 14, seed 0, one thread, on the
# 320-person demo set, stage 1 at lr 3e-3): the demo's prompt accuracy 0.757 against 0.522 with free projections
# at 5e-4 (whose singular values fell from 0.51 to 0.002: directions the captions never used), class means 0.60
# against 0.52; zero-shot top-1 0.46 either way; the temperature ends at 17.3 instead of 14.5.
PRETRAIN_CONFIG = PretrainConfig(epochs=15, batch_size=64, instances_per_group=4, lr=5e-4, input_size=(128, 64),
                                 orthogonal_projections=True, logit_scale_lr=0.05, seed=0)
CLIP_FILE = "tiny_clip_vit.pt"
CLIP_ARCH, CLIP_SEED = "vit-small", 0


def ensure_dataset(root: Path, name: str, **kwargs: Any) -> Path:
    """``root / name`` generated with ``kwargs`` unless it already holds exactly that dataset."""
    target = Path(root) / name
    generate_synthetic_dataset(target, skip_existing=True, overwrite=True, **kwargs)
    return target


def _recipe(data: Path, config: PretrainConfig) -> dict[str, Any]:
    """What the pre-trained CLIP depends on; the captions' checksum, so that new wording retrains it."""
    captions = data / CAPTIONS_FILE
    return {"arch": CLIP_ARCH, "init_seed": CLIP_SEED, "data": data.name, "data_args": PRETRAIN_DATASET[1],
            "captions_sha256": file_sha256(captions) if captions.is_file() else None,
            "config": config.model_dump(mode="json")}


def ensure_pretrained_clip(path: str | os.PathLike, data: Path, config: PretrainConfig = PRETRAIN_CONFIG,
                           device: str = "auto", progress: bool = True) -> Path:
    """The small CLIP pre-trained on ``data`` at ``path``, trained now unless its sidecar shows the same recipe."""
    path = Path(path)
    sidecar = Path(str(path) + ".json")
    recipe = _recipe(data, config)
    if path.is_file() and sidecar.is_file():
        try:
            if read_json(sidecar).get("recipe") == recipe:
                return path
        except (OSError, ValueError):
            pass
    model = build_tiny_clip(CLIP_ARCH, seed=CLIP_SEED)
    pretrain_clip_folder(data, model, path, config, device_spec=resolve_device(device, "fp32"), progress=progress,
                         extra_meta={"recipe": recipe})
    return path


def build_embedded(root: str | os.PathLike = "data/embedded", progress: bool = True) -> dict[str, Path]:
    root = Path(root)
    built = {name: ensure_dataset(root, name, **kw) for name, kw in DATASETS.items()}
    name, kw = PRETRAIN_DATASET
    built[name] = ensure_dataset(root, name, **kw)
    built["clip"] = ensure_pretrained_clip(root / CLIP_FILE, built[name], progress=progress)
    return built


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reid_pipeline.embedded", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/embedded", help="where to build (default data/embedded)")
    parser.add_argument("--no-progress", action="store_true", help="log epochs instead of a progress bar")
    args = parser.parse_args(argv)
    for name, path in build_embedded(args.root, progress=not args.no_progress).items():
        print(f"embedded {name}: {path}")
