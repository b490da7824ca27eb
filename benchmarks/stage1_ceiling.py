"""Where the demo's stage-1 prompt accuracy stops: what the frozen small CLIP's features allow,
against what its frozen text tower reaches, side by side in one run on the embedded data.

Stage 1 learns one text feature per training identity, through the frozen text tower, so that the
identity's images (frozen image features) match it under CLIP-ReID's SupCon loss on raw dot products.
Its image→prompt accuracy is bounded by two things this script separates:

* ``class means`` — each identity's mean normalised image feature as its prototype (no training);
* ``free prototypes ×s`` — one free vector per identity, trained with the same loss
  (:func:`~reid_pipeline.training.supcon.stage1_loss`), batch and epochs as stage 1 (Adam, lr 1e-2),
  its length held at ``s`` times the prompts' mean text-feature length: the best any set of text
  features of that length does under this loss, i.e. the ceiling the image features set;
* ``free pre-LN ×s`` — one free vector per identity in the text tower's residual stream, where the
  end-of-text token's state enters the frozen ``ln_final`` and ``text_projection`` (times ``s``), trained
  with the same loss (Adam, lr 3e-2): the best the prompts could do if the transformer blocks steered
  the end-of-text state anywhere, i.e. the ceiling the tower's last normalisation and projection set;
* ``stage-1 prompts ×s`` — the demo preset's stage 1 itself (``train_prompts``), with the text tower's
  output projection multiplied by ``s`` (``s = 1``: the demo as it is).

The gap between the free prototypes and the free pre-LN vectors is the projection's: pre-training on
captions leaves its singular values falling steeply (printed: the largest, the median and the
smallest but one), so directions the captions never used are hard to reach. The gap between the
pre-LN vectors and the prompts is the transformer blocks'. Together they are the text tower's: the
prompt tokens cannot steer its output to where the free prototypes go. Raising ``s`` (a larger logit scale for the loss)
lifts the ceiling but not the prompts. The last line is the prompts' accuracy over the ceiling's at
the first ``s``. CPU, fp32, ``--threads`` torch threads (default 1).

Run: ``.venv/bin/python benchmarks/stage1_ceiling.py [--clip PATH] [--scales 1,2]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from reid_pipeline import pipeline as steps
from reid_pipeline.assets.training import PromptCheckpointConfig
from reid_pipeline.device import resolve_device
from reid_pipeline.model.prompt import TextEncoder, encode_all_classes
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.stage1 import train_prompts
from reid_pipeline.training.supcon import stage1_loss

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "embedded" / "synthetic"
PRESET = ROOT / "configs" / "demo.yaml"


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Each class's mean normalised feature."""
    unit = F.normalize(features, dim=1)
    return torch.stack([unit[labels == c].mean(0) for c in range(num_classes)])


def free_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, length: float, epochs: int,
                    batch_size: int, seed: int, lr: float = 1e-2) -> torch.Tensor:
    """One vector per class of fixed ``length``, trained with the stage-1 loss from the class means."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.Parameter(class_means(features, labels, num_classes))
    opt = torch.optim.Adam([directions], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(features), generator=gen)
        for start in range(0, len(features), batch_size):
            idx = perm[start : start + batch_size]
            protos = length * F.normalize(directions, dim=1)
            loss = stage1_loss(features[idx], protos[labels[idx]], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return directions.detach()


def free_residuals(features: torch.Tensor, labels: torch.Tensor, num_classes: int, model: torch.nn.Module,
                   epochs: int, batch_size: int, seed: int, lr: float = 3e-2) -> torch.Tensor:
    """One free end-of-text state per class, through ``model``'s frozen ``ln_final`` and ``text_projection``,
    trained with the stage-1 loss; returns the resulting text features."""
    gen = torch.Generator().manual_seed(seed)
    width = model.text_projection.shape[0]
    states = torch.nn.Parameter(torch.randn(num_classes, width, generator=gen))
    opt = torch.optim.Adam([states], lr=lr)

    def text() -> torch.Tensor:
        return model.ln_final(states) @ model.text_projection

    for _ in range(epochs):
        perm = torch.randperm(len(features), generator=gen)
        for start in range(0, len(features), batch_size):
            idx = perm[start : start + batch_size]
            loss = stage1_loss(features[idx], text()[labels[idx]], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clip", type=Path, default=ROOT / "data" / "embedded" / "tiny_clip_vit.pt")
    parser.add_argument("--scales", default="1,2", help="comma-separated length factors s (default 1,2)")
    parser.add_argument("--n-ctx", type=int, default=None, help="prompt tokens per identity (default: the preset's)")
    parser.add_argument("--lr", type=float, default=None, help="stage-1 learning rate (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if not DATA.is_dir() or not args.clip.is_file():
        print(f"{DATA} or {args.clip} missing: run `make embedded` first", file=sys.stderr)
        return 2
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    torch.set_num_threads(args.threads)
    ops = yaml.safe_load(PRESET.read_text())["ops"]
    clip_cfg = ops["frozen_clip"]["config"]
    size = (int(clip_cfg["input_height"]), int(clip_cfg["input_width"]))
    spec = resolve_device("cpu", "fp32")
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="stage1_ceiling_") as tmp:
        out = Path(tmp)
        for sub in ("manifest", "clip"):
            (out / sub).mkdir()
        manifest, _, _ = steps.manifest_step(DATA, out / "manifest", check_images=False)
        frozen, _, _ = steps.frozen_clip_step(str(args.clip), out / "clip", input_size=size)
        clip_model, _ = steps.load_frozen_clip(frozen.clip)
        stage1 = dict(ops["prompt_checkpoint"]["config"])
        stage1.update({k: v for k, v in (("n_ctx", args.n_ctx), ("lr", args.lr)) if v is not None})
        config = PromptCheckpointConfig(**stage1).library_config(frozen.clip.arch)
        train = steps.split_rows(steps.read_manifest(manifest), "train")
        cache = steps.image_cache(manifest, train, out / "cache", lambda _m: None)
        features = extract_features(clip_model.encode_image, cache, None, steps._test_transform(frozen.clip), spec)
        labels = torch.as_tensor(train.label.to_numpy().copy(), dtype=torch.long)
        classes = manifest.num_classes
        means = class_means(features, labels, classes)
        rows.append(("class means", float("nan"), steps.image_to_prompt_accuracy(features, labels, means)))
        prompt_length = None
        for s in scales:
            model = copy.deepcopy(clip_model)
            with torch.no_grad():
                model.text_projection.mul_(s)
            t0 = time.perf_counter()
            result = train_prompts(model, features, labels, classes, config, spec)
            with torch.no_grad():
                text = encode_all_classes(result.prompt_learner, TextEncoder(model)).float()
            if prompt_length is None:  # the demo's (s = 1 first, or the first s given) sets the unit length
                prompt_length = float(text.norm(dim=1).mean()) / s
            rows.append((f"stage-1 prompts x{s:g}", time.perf_counter() - t0,
                         steps.image_to_prompt_accuracy(features, labels, text)))
            t0 = time.perf_counter()
            protos = free_prototypes(features, labels, classes, s * prompt_length, config.epochs, config.batch_size,
                                     config.seed)
            rows.append((f"free prototypes x{s:g}", time.perf_counter() - t0,
                         steps.image_to_prompt_accuracy(features, labels, protos)))
            t0 = time.perf_counter()
            pre_ln = free_residuals(features, labels, classes, model, config.epochs, config.batch_size, config.seed)
            rows.append((f"free pre-LN x{s:g}", time.perf_counter() - t0,
                         steps.image_to_prompt_accuracy(features, labels, pre_ln)))
    print(f"{classes} identities, {len(labels)} training images, image features {features.shape[1]}-d, "
          f"prompt text-feature length {prompt_length:.2f}, mean image-feature length {float(features.norm(dim=1).mean()):.2f}")
    sv = torch.linalg.svdvals(clip_model.text_projection.detach().float())
    print(f"text_projection singular values: largest {float(sv[0]):.3f}, median {float(sv[len(sv) // 2]):.3f}, "
          f"smallest but one {float(sv[-2]):.4f}")
    print(f"{'prototypes':<22} {'image->prompt acc':>17} {'seconds':>8}")
    for name, seconds, acc in rows:
        print(f"{name:<22} {acc:17.3f} {seconds:8.0f}")
    first = f"x{scales[0]:g}"
    prompts = next(acc for name, _, acc in rows if name == f"stage-1 prompts {first}")
    ceiling = next(acc for name, _, acc in rows if name == f"free prototypes {first}")
    print(f"stage1 prompts / ceiling ({first}): {prompts / ceiling:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
