"""The demo's learning, recipe against recipe: stage 1, stage 2 and evaluation of the demo preset and of
variants of it, side by side in one run on the embedded data.

Each variant runs the library steps the assets run (:mod:`reid_pipeline.pipeline`: manifest → frozen CLIP
→ prompts → encoder → features → metrics) with the settings of ``configs/demo.yaml`` mapped exactly as
the assets map them (``PromptCheckpointConfig`` / ``VisualEncoderConfig.library_config``), changed by
the variant only where it says so:

* ``demo`` — the preset as it is;
* ``paper-erasing`` — stage 2 with the paper's random erasing (``erase_p: 0.5``; the preset has none);
* ``more-epochs`` — stage 2 for twice the epochs (milestone scaled);
* ``stride-8`` — overlapping patches (OLP, stride 8: 105 tokens instead of 32) in the frozen CLIP and
  stage 2;
* ``closed-set`` — an upper bound of the backbone, not a recipe: stage 1 and 2 trained on the gallery
  images of the *test* identities themselves (a temporary copy of the dataset whose training split is
  those images), then the usual query × gallery evaluation, with the epochs scaled so that both
  stages take as many steps as the demo's. What the encoder reaches when it has seen every test
  person, in other cameras than the queries'.

Prints one row per variant: frozen baseline mAP, stage-1 image→prompt accuracy, stage-2 final train
accuracy, fine-tuned and re-ranked mAP, rank-1 and the seconds of stage 1 and stage 2 (also relative to
``demo``). CPU, fp32; ``--threads`` torch threads (default 1, as the demo figures in the README).

Run: ``.venv/bin/python benchmarks/demo_recipes.py [--variants demo,paper-erasing,...] [--seed S]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from reid_pipeline import pipeline as steps
from reid_pipeline.assets.training import PromptCheckpointConfig, VisualEncoderConfig
from reid_pipeline.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs" / "demo.yaml"
DATA = ROOT / "data" / "embedded" / "synthetic"
VARIANTS = ("demo", "paper-erasing", "more-epochs", "stride-8", "closed-set")


def closed_set_copy(data: Path, out: Path) -> Path:
    """``data`` with its training split replaced by the gallery images of its test identities."""
    for split in ("query", "bounding_box_test"):
        shutil.copytree(data / split, out / split)
    (out / "bounding_box_train").mkdir(parents=True)
    for image in sorted((data / "bounding_box_test").iterdir()):
        if image.name.split("_")[0] not in ("0000", "-1"):  # distractors and junk are nobody to learn
            shutil.copy2(image, out / "bounding_box_train" / image.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="demo,paper-erasing,closed-set",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default demo,paper-erasing,closed-set)")
    parser.add_argument("--seed", type=int, default=0, help="added to the preset's stage-1 and stage-2 seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clip", type=Path, default=ROOT / "data" / "embedded" / "tiny_clip_vit.pt",
                        help="the CLIP archive to start from (default: the embedded one)")
    parser.add_argument("--preset", type=Path, default=PRESET, help="the run-config preset (default configs/demo.yaml)")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    clip_path = args.clip
    if not DATA.is_dir() or not clip_path.is_file():
        print(f"{DATA} or {clip_path} missing: run `make embedded` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print_rows(run_variants(variants, clip_path, args.seed, args.preset))
    return 0


def run_variants(variants: list[str], clip_path: Path, seed: int = 0, preset: Path = PRESET) -> list[tuple]:
    """One row per variant: (name, baseline mAP, prompt acc, train acc, mAP, re-ranked, rank-1, stage-1 s, stage-2 s)."""
    ops = yaml.safe_load(preset.read_text())["ops"]
    clip_cfg = ops["frozen_clip"]["config"]
    size = (int(clip_cfg["input_height"]), int(clip_cfg["input_width"]))
    stage1_cfg = ops["prompt_checkpoint"]["config"]
    stage2_cfg = ops["visual_encoder"]["config"]
    evaluation = steps.EvaluationSettings(**{k: v for k, v in ops["evaluation_metrics"]["config"].items()
                                              if k in steps.EvaluationSettings.model_fields})
    spec = resolve_device("cpu", "fp32")
    demo_train_images = sum(1 for p in (DATA / "bounding_box_train").iterdir() if p.suffix == ".jpg")
    rows = []
    with tempfile.TemporaryDirectory(prefix="demo_recipes_") as tmp:
        work = Path(tmp)
        for variant in variants:
            out = work / variant
            data = closed_set_copy(DATA, out / "data") if variant == "closed-set" else DATA
            stride = 8 if variant == "stride-8" else None
            s2 = dict(stage2_cfg, seed=1234 + seed)
            if variant == "paper-erasing":
                s2["erase_p"] = 0.5
            elif variant == "more-epochs":
                s2.update(epochs=2 * s2["epochs"], steps=[2 * s for s in s2["steps"]])
            for sub in ("manifest", "clip", "prompts", "encoder", "features", "metrics"):
                (out / sub).mkdir(parents=True)
            manifest, df, _ = steps.manifest_step(data, out / "manifest", check_images=False)
            s1 = dict(stage1_cfg, seed=seed)
            if variant == "closed-set":  # as many steps as the demo: epochs × (demo's / this training split)
                scale = demo_train_images / int((df.split == "train").sum())
                s1["epochs"] = round(s1["epochs"] * scale)
                s2.update(epochs=round(s2["epochs"] * scale), steps=[round(s * scale) for s in s2["steps"]],
                          warmup_epochs=round(s2.get("warmup_epochs", 0) * scale))
            frozen, _, _ = steps.frozen_clip_step(str(clip_path), out / "clip", input_size=size, stride=stride)
            t0 = time.perf_counter()
            prompts, _, stage1 = steps.prompts_step(
                manifest, frozen, PromptCheckpointConfig(**s1).library_config(frozen.clip.arch),
                spec, out / "prompts", cache_dir=out / "cache")
            t1 = time.perf_counter()
            encoder, result, _ = steps.encoder_step(
                manifest, frozen, prompts, VisualEncoderConfig(**s2).library_config(frozen), spec, out / "encoder",
                cache_dir=out / "cache")
            t2 = time.perf_counter()
            features = steps.features_step(manifest, encoder, spec, out / "features", cache_dir=out / "cache")
            metrics, _ = steps.metrics_step(features, evaluation, out / "metrics")
            m = metrics.metrics
            rows.append((variant, m["baseline_mAP"], stage1["image_to_prompt_accuracy"], result.final_accuracy,
                         m["mAP"], m["reranked_mAP"], m["rank-1"], t1 - t0, t2 - t1))
            print(f"done {variant}: fine-tuned mAP {m['mAP']:.3f} ({t2 - t0:.0f} s)", file=sys.stderr, flush=True)
    return rows


def print_rows(rows: list[tuple]) -> None:
    base_s2 = next((r[8] for r in rows if r[0] == "demo"), None)
    print(f"{'variant':<12} {'baseline':>8} {'prompt acc':>10} {'train acc':>9} {'mAP':>6} {'re-ranked':>9} "
          f"{'rank-1':>6} {'stage1 s':>8} {'stage2 s':>8} {'vs demo':>7}")
    for name, base, acc1, acc2, fine, rr, r1, s1, s2_time in rows:
        rel = f"{s2_time / base_s2:.2f}x" if base_s2 else "-"
        print(f"{name:<12} {base:8.3f} {acc1:10.3f} {acc2:9.3f} {fine:6.3f} {rr:9.3f} {r1:6.3f} {s1:8.0f} "
              f"{s2_time:8.0f} {rel:>7}")


if __name__ == "__main__":
    sys.exit(main())
