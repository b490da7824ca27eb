"""The small CLIP's pre-training recipe against the demo it leads to, side by side in one run.

For each recipe, this pre-trains the embedded default's small CLIP exactly as ``make embedded`` does
(:func:`reid_pipeline.embedded.build.ensure_pretrained_clip`: the same architecture, seed and loop) on
captioned synthetic people generated with :data:`~reid_pipeline.embedded.build.PRETRAIN_DATASET`'s
arguments, changed only where the recipe says so, then runs the demo preset on it
(``benchmarks/demo_recipes.py``'s ``demo`` variant: manifest → frozen CLIP → prompts → encoder → metrics):

* ``embedded`` — the recipe ``make embedded`` uses (800 people × 4 images, 15 epochs);
* ``epochs-x2`` — the same people for twice the epochs;
* ``epochs-short`` — the same people for two thirds of the epochs (10): what a shorter ``make embedded`` costs;
* ``people-x2`` — twice the people (1600 × 4) for the same epochs: as many steps as ``epochs-x2``.

Prints one row per recipe: pre-training seconds and zero-shot image→caption top-1 on its held-out
people (10 % of them, so chance differs with the number of people: it is printed), then the demo's
frozen baseline mAP, stage-1 image→prompt accuracy, fine-tuned and re-ranked mAP, rank-1 and the
fine-tuned mAP's margin over the baseline. CPU, fp32, ``--threads`` torch threads (default 1).

Run: ``.venv/bin/python benchmarks/pretrain_recipes.py [--recipes embedded,epochs-x2,people-x2] [--seed S]``
(about 10 minutes a recipe on one busy CPU core).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_recipes import run_variants

from reid_pipeline.embedded import build
from reid_pipeline.storage import read_json

RECIPES: dict[str, tuple[dict, dict]] = {
    # name: (changes to the pre-training data's generator arguments, changes to PretrainConfig)
    "embedded": ({}, {}),
    "epochs-x2": ({}, {"epochs": 2 * build.PRETRAIN_CONFIG.epochs}),
    "epochs-short": ({}, {"epochs": round(2 * build.PRETRAIN_CONFIG.epochs / 3)}),
    "people-x2": ({"num_ids": 2 * build.PRETRAIN_DATASET[1]["num_ids"]}, {}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--seed", type=int, default=0, help="added to the demo preset's stage-1 and stage-2 seeds")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(args.threads)
    name, data_args = build.PRETRAIN_DATASET
    rows = []
    with tempfile.TemporaryDirectory(prefix="pretrain_recipes_") as tmp:
        work = Path(tmp)
        for recipe in recipes:
            data_change, config_change = RECIPES[recipe]
            data = build.ensure_dataset(work / "data", f"{name}-{recipe}", **dict(data_args, **data_change))
            clip_path = work / f"{recipe}.pt"
            t0 = time.perf_counter()
            build.ensure_pretrained_clip(clip_path, data, build.PRETRAIN_CONFIG.model_copy(update=config_change),
                                         device="cpu", progress=False)
            seconds = time.perf_counter() - t0
            retrieval = read_json(Path(str(clip_path) + ".json"))["retrieval"]
            (demo,) = run_variants(["demo"], clip_path, args.seed)
            rows.append((recipe, seconds, retrieval["image_to_caption_top1"], retrieval["chance"], *demo[1:]))
            print(f"done {recipe}: zero-shot {retrieval['image_to_caption_top1']:.3f}, fine-tuned mAP {demo[4]:.3f}",
                  file=sys.stderr, flush=True)
    print(f"{'recipe':<10} {'pretrain s':>10} {'zero-shot':>9} {'chance':>6} {'baseline':>8} {'prompt acc':>10} "
          f"{'mAP':>6} {'re-ranked':>9} {'rank-1':>6} {'margin':>6}")
    for recipe, seconds, zs, chance, base, acc1, _train, fine, rr, r1, _s1, _s2 in rows:
        print(f"{recipe:<10} {seconds:10.0f} {zs:9.3f} {chance:6.3f} {base:8.3f} {acc1:10.3f} {fine:6.3f} {rr:9.3f} "
              f"{r1:6.3f} {fine - base:+6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
