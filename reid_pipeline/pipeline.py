"""The pipeline's steps as plain functions: descriptors and folders in, descriptors out.

Each step is what one Dagster asset does, without Dagster: the assets (``reid_pipeline.assets``), a
notebook, the ``torchrun`` entry point or a test call the same function. A step writes only into the
``out_dir`` it is given (a fresh folder per materialisation) and returns the typed descriptor of what
it wrote (:mod:`reid_pipeline.artifacts`) plus what is worth reporting.

Steps:
:func:`manifest_step` → :func:`frozen_clip_step` → :func:`prompts_step` (stage 1) →
:func:`encoder_step` (stage 2) → :func:`features_step` → :func:`metrics_step`; across datasets:
:func:`cross_domain_step` (every trained encoder on every dataset's query × gallery).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from reid_pipeline.artifacts import (
    ClipRef,
    CrossDomainArtifact,
    EncoderArtifact,
    FeaturesArtifact,
    FrozenClipArtifact,
    ManifestArtifact,
    MetricsArtifact,
    PromptArtifact,
)
from reid_pipeline.data import ManifestReport, build_manifest_with_report, manifest_fingerprint, summarize_manifest
from reid_pipeline.data.cache import ImageCache
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.device import DeviceSpec
from reid_pipeline.evaluation.metrics import ReIDEvaluator
from reid_pipeline.evaluation.plots import plot_cmc, plot_cross_domain, plot_rank_list, plot_training_history
from reid_pipeline.model.clip_loader import ClipInfo, ClipWeightsError, load_clip
from reid_pipeline.model.prompt import (
    PromptLearner,
    TextEncoder,
    encode_all_classes,
    load_prompt_tokens,
    prompt_meta,
    prompt_state,
)
from reid_pipeline.model.reid_model import ReIDModel, load_reid_model, save_reid_model
from reid_pipeline.storage import atomic_write_bytes, load_tensors, save_tensors, write_json
from reid_pipeline.training.extract import extract_features
from reid_pipeline.training.stage1 import Stage1Config, Stage1Result, train_prompts
from reid_pipeline.training.stage2 import (
    LOSS_TERMS,
    Stage1MismatchError,
    Stage2Config,
    Stage2Result,
    build_reid_model,
    train_visual_encoder,
)

__all__ = [
    "RANKS",
    "EvaluationSettings",
    "StepLog",
    "version_of",
    "read_manifest",
    "split_rows",
    "image_cache",
    "manifest_step",
    "frozen_clip_step",
    "load_frozen_clip",
    "check_stage1_identities",
    "prompt_text_features",
    "image_to_prompt_accuracy",
    "prompts_step",
    "encoder_step",
    "features_step",
    "metrics_step",
    "CrossDomainReport",
    "cross_domain_step",
]

RANKS = (1, 5, 10)
StepLog = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


def version_of(*parts: Any) -> str:
    """A short, stable version string from any JSON-able parts."""
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------- data


def read_manifest(manifest: ManifestArtifact) -> pd.DataFrame:
    path = Path(manifest.manifest)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest file of this dataset_manifest is gone — rematerialise dataset_manifest")
    return pd.read_parquet(path)


def split_rows(df: pd.DataFrame, split: str) -> pd.DataFrame:
    rows = df[df.split == split].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the manifest has no {split!r} images")
    return rows


def image_cache(manifest: ManifestArtifact, rows: pd.DataFrame, cache_dir: str | os.PathLike,
                log: StepLog = _quiet) -> ImageCache:
    """Decode-once uint8 cache of ``rows`` on disk under ``cache_dir``, shared between steps."""
    def progress(done: int, total: int) -> None:
        if done == total or done % 2000 == 0:
            log(f"decoded {done}/{total} images")

    def report(plan: dict) -> None:
        log(f"image cache: {plan['images']} images, {plan['bytes'] / 2**20:.1f} MiB on disk under {cache_dir}"
            + (f" ({plan['downscaled']} downscaled to {plan['max_side']} px)" if plan.get("downscaled") else ""))

    return ImageCache.from_paths(manifest.root, list(rows.path), mode="disk", cache_dir=Path(cache_dir),
                                 key=manifest.fingerprint, progress=progress, report=report)


def manifest_step(root: str | os.PathLike, out_dir: Path, *, layout: str = "auto", check_images: bool = True,
                  on_bad_image: str = "error", external_links: str = "skip", dataset: str | None = None,
                  ) -> tuple[ManifestArtifact, pd.DataFrame, ManifestReport]:
    """Build the manifest of ``root`` (the dataset named ``dataset``), write ``manifest.parquet`` and
    return its descriptor.

    ``external_links``: entries whose symlinks resolve outside ``root`` are left out and reported
    (``"skip"``) or followed (``"keep"``) — the same policy as the ``raw_dataset`` fingerprint.
    """
    root = Path(root)
    df, report = build_manifest_with_report(root, layout=layout, check_images=check_images, on_bad_image=on_bad_image,
                                            external_links=external_links)
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    path = atomic_write_bytes(out_dir / "manifest.parquet", buf.getvalue())
    train = df[df.split == "train"]
    artifact = ManifestArtifact(
        artifact_dir=str(out_dir), manifest=str(path), root=str(root), layout=report.layout, dataset=dataset,
        fingerprint=manifest_fingerprint(df, root), num_classes=int(train.pid.nunique()),
        label_to_pid=[int(p) for p in sorted(train.pid.unique())],
        num_cameras=int(df.camid.max()) + 1 if len(df) else 0,
    )
    return artifact, df, report


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per-split counts of a manifest (images, identities, cameras)."""
    return summarize_manifest(df).reset_index()


# ----------------------------------------------------------------------------------- backbone


def frozen_clip_step(source: str, out_dir: Path, *, input_size: tuple[int, int] = (256, 128),
                     stride: int | None = None) -> tuple[FrozenClipArtifact, torch.nn.Module, ClipInfo]:
    """Load CLIP from ``source`` (a model name or a file), frozen and adapted; describe it."""
    model, info = load_clip(source, input_size=tuple(input_size), stride=stride)
    ref = ClipRef(source=info.source, name=info.name, sha256=info.sha256, arch=info.arch,
                  input_size=tuple(info.input_size), stride=info.stride,
                  version=version_of(info.sha256, tuple(info.input_size), info.stride))
    return FrozenClipArtifact(artifact_dir=str(out_dir), clip=ref), model, info


def load_frozen_clip(ref: ClipRef) -> tuple[torch.nn.Module, ClipInfo]:
    """Reload the CLIP a :class:`ClipRef` describes, refusing weights whose checksum changed."""
    model, info = load_clip(ref.source, input_size=tuple(ref.input_size), stride=ref.stride)
    if info.sha256 != ref.sha256:
        raise ClipWeightsError(
            f"{ref.source}: weights changed since frozen_clip was materialised "
            f"(sha256 {info.sha256[:12]}…, recorded {ref.sha256[:12]}…) — rematerialise frozen_clip"
        )
    return model, info


def _test_transform(ref: ClipRef) -> TestTransform:
    mean, std = normalization_for(ref.arch)
    return TestTransform(tuple(ref.input_size), mean, std)


# ----------------------------------------------------------------------------------- stage 1


def image_to_prompt_accuracy(image_features: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor) -> float:
    """Share of images whose most similar identity prompt (cosine) is their own identity's."""
    img = torch.nn.functional.normalize(image_features.float(), dim=1)
    txt = torch.nn.functional.normalize(text_features.float().to(img.device), dim=1)
    return float(((img @ txt.T).argmax(dim=1).cpu() == labels.cpu()).float().mean())


def prompts_step(manifest: ManifestArtifact, frozen: FrozenClipArtifact, config: Stage1Config, spec: DeviceSpec,
                 out_dir: Path, *, cache_dir: Path, state_path: Path | None = None, log: StepLog = _quiet,
                 on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None, parallel=None,
                 ) -> tuple[PromptArtifact, Stage1Result, dict[str, Any]]:
    """Stage 1: image features of the training split once (training precision, as CLIP-ReID), then the
    prompt tokens; writes ``prompt_tokens.safetensors`` (+ JSON) and ``stage1_loss.png``.

    ``parallel``: one rank of a ``torch.distributed`` job (:mod:`reid_pipeline.training.distributed`);
    every rank trains, only rank 0 writes (the others return ``None`` for the artefact)."""
    clip_model, info = load_frozen_clip(frozen.clip)
    train = split_rows(read_manifest(manifest), "train")
    log(f"stage 1 on {spec.describe()}: {len(train)} images, {manifest.num_classes} identities, {config.epochs} epochs")
    cache = image_cache(manifest, train, cache_dir, log)
    features = extract_features(clip_model.encode_image, cache, None, _test_transform(frozen.clip), spec, parallel=parallel)
    labels = torch.as_tensor(train.label.to_numpy(copy=True), dtype=torch.long)
    result = train_prompts(clip_model, features, labels, manifest.num_classes, config, spec,
                           state_path=state_path, on_epoch_end=on_epoch_end, log=log, parallel=parallel)
    if parallel is not None and not parallel.is_main:
        return None, result, {}
    learner = result.prompt_learner
    with torch.no_grad(), spec.autocast():
        text = encode_all_classes(learner, TextEncoder(clip_model))
    accuracy = image_to_prompt_accuracy(features, labels, text)
    log(f"stage 1: image→prompt accuracy {accuracy:.4f} over the {len(labels)} training images "
        f"(chance {1 / manifest.num_classes:.4f}: {manifest.num_classes} identities)")
    tokens = save_tensors(out_dir / "prompt_tokens.safetensors", prompt_state(learner), {
        **prompt_meta(learner), "label_to_pid": manifest.label_to_pid, "clip": frozen.clip.model_dump(mode="json"),
        "manifest_fingerprint": manifest.fingerprint, "config": config.model_dump(), "precision": result.precision,
        "final_loss": result.final_loss, "image_to_prompt_accuracy": accuracy,
    })
    plot = plot_training_history(result.history, {"loss": ["loss"], "learning rate": ["lr"]},
                                 out_dir / "stage1_loss.png", title="stage 1 SupCon")
    artifact = PromptArtifact(
        artifact_dir=str(out_dir), tokens=str(tokens), num_classes=manifest.num_classes,
        label_to_pid=manifest.label_to_pid, template=learner.template, n_ctx=config.n_ctx, clip=frozen.clip,
        manifest_fingerprint=manifest.fingerprint, precision=result.precision,
    )
    return artifact, result, {"image_to_prompt_accuracy": accuracy, "loss_curve": plot}


# ----------------------------------------------------------------------------------- stage 2


def check_stage1_identities(prompts: PromptArtifact, manifest: ManifestArtifact) -> None:
    """Stage 1 must have learned exactly the manifest's training identities, in the same order."""
    ours, theirs = list(manifest.label_to_pid), list(prompts.label_to_pid)
    if ours != theirs or prompts.manifest_fingerprint != manifest.fingerprint:
        added, removed = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise Stage1MismatchError(
            f"prompt_checkpoint {prompts.tokens} was trained on {len(theirs)} identities of another "
            f"manifest (now {len(ours)}; new pids {added[:10]}, gone {removed[:10]}) — rematerialise "
            "prompt_checkpoint (stage 1) before stage 2"
        )


def prompt_text_features(prompts: PromptArtifact, clip_model: torch.nn.Module) -> torch.Tensor:
    """Frozen text features of every identity from the stage-1 tokens, computed once (no grad)."""
    learner = PromptLearner(prompts.num_classes, clip_model, prompts.n_ctx, prompts.template)
    load_prompt_tokens(learner, prompts.tokens)
    return encode_all_classes(learner, TextEncoder(clip_model))


def encoder_step(manifest: ManifestArtifact, frozen: FrozenClipArtifact, prompts: PromptArtifact, config: Stage2Config,
                 spec: DeviceSpec, out_dir: Path, *, cache_dir: Path, state_path: Path | None = None,
                 log: StepLog = _quiet, on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None,
                 parallel=None) -> tuple[EncoderArtifact, Stage2Result, dict[str, Any]]:
    """Stage 2: fine-tune the image encoder; writes ``visual_encoder.safetensors`` (+ JSON) and curves.
    ``parallel``: as in :func:`prompts_step` (only rank 0 writes)."""
    check_stage1_identities(prompts, manifest)
    clip_model, _ = load_frozen_clip(frozen.clip)
    train = split_rows(read_manifest(manifest), "train")
    text = prompt_text_features(prompts, clip_model)
    model = build_reid_model(clip_model, prompts.num_classes, config, num_cameras=manifest.num_cameras)
    cache = image_cache(manifest, train, cache_dir, log)
    result = train_visual_encoder(model, text, cache, train.label.to_numpy(), train.camid.to_numpy(), config, spec,
                                  state_path=state_path, on_epoch_end=on_epoch_end, log=log, parallel=parallel)
    if parallel is not None and not parallel.is_main:
        return None, result, {}
    weights = save_reid_model(out_dir / "visual_encoder.safetensors", model.cpu(), {
        "label_to_pid": manifest.label_to_pid, "clip": frozen.clip.model_dump(mode="json"),
        "manifest_fingerprint": manifest.fingerprint, "prompt_tokens": prompts.tokens,
        "config": config.model_dump(mode="json"), "precision": result.precision,
        "final_accuracy": result.final_accuracy,
    })
    plot = plot_training_history(
        result.history, {"loss terms (unweighted)": list(LOSS_TERMS), "train accuracy": ["acc", "id_acc"],
                         "learning rate": ["lr"]}, out_dir / "stage2_losses.png", title="stage 2")
    artifact = EncoderArtifact(
        artifact_dir=str(out_dir), weights=str(weights), num_classes=prompts.num_classes,
        label_to_pid=manifest.label_to_pid, sie_camera=config.sie_camera, clip=frozen.clip,
        manifest_fingerprint=manifest.fingerprint, prompt_tokens=prompts.tokens, precision=result.precision,
    )
    return artifact, result, {"loss_curves": plot}


# ----------------------------------------------------------------------------------- evaluation


def features_step(manifest: ManifestArtifact, encoder: EncoderArtifact, spec: DeviceSpec, out_dir: Path, *,
                  cache_dir: Path, batch_size: int = 128, log: StepLog = _quiet, parallel=None) -> FeaturesArtifact:
    """Query and gallery features of the fine-tuned encoder and of the frozen CLIP (baseline).

    ``parallel``: as in :func:`prompts_step`; each rank extracts its share, rank 0 writes.

    ``spec`` is used as given: CLIP-ReID extracts test features in fp32 (no autocast).
    """
    clip_model, _ = load_frozen_clip(encoder.clip)
    model, _ = load_reid_model(encoder.weights, clip_model)
    baseline = ReIDModel.frozen_baseline(clip_model)
    transform = _test_transform(encoder.clip)
    manifest_df = read_manifest(manifest)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"root": manifest.root, "arch": encoder.clip.arch, "precision": spec.precision}
    for split in ("query", "gallery"):
        rows = split_rows(manifest_df, split)
        cache = image_cache(manifest, rows, cache_dir, log)
        cams = rows.camid.to_numpy() if model.num_cameras else None
        tensors[split] = extract_features(model, cache, None, transform, spec, batch_size, cam_ids=cams, parallel=parallel)
        tensors[f"baseline_{split}"] = extract_features(baseline, cache, None, transform, spec, batch_size, parallel=parallel)
        tensors[f"{split}_pids"] = torch.as_tensor(rows.pid.to_numpy(copy=True), dtype=torch.int64)
        tensors[f"{split}_camids"] = torch.as_tensor(rows.camid.to_numpy(copy=True), dtype=torch.int64)
        meta[f"{split}_paths"] = list(rows.path)
        log(f"{split}: {len(rows)} images → features {tuple(tensors[split].shape)} ({spec.precision})")
    if parallel is not None and not parallel.is_main:
        return None
    path = save_tensors(out_dir / "features.safetensors", tensors, meta)
    return FeaturesArtifact(artifact_dir=str(out_dir), features=str(path), root=manifest.root,
                            encoder_weights=encoder.weights, precision=spec.precision)


class EvaluationSettings(BaseModel):
    """The evaluation protocol's knobs; defaults are CLIP-ReID's (re-ranking k1 50, k2 15, λ 0.3)."""

    model_config = ConfigDict(extra="forbid")

    max_rank: int = Field(50, ge=1)
    rerank: bool = True
    k1: int = Field(50, ge=1)
    k2: int = Field(15, ge=1)
    lambda_value: float = Field(0.3, ge=0, le=1)
    rank_list_queries: int = Field(6, ge=1)


def _summary(prefix: str, result: dict) -> dict[str, float]:
    out = {f"{prefix}mAP": float(result["mAP"]), f"{prefix}mINP": float(result["mINP"])}
    for r in RANKS:
        out[f"{prefix}rank-{r}"] = float(result[f"rank-{r}"])
    return out


@dataclass
class MetricsReport:
    """What :func:`metrics_step` measured besides the descriptor."""

    results: dict[str, dict[str, Any]]
    num_query: int
    num_gallery: int
    cmc_png: Path
    rank_list_png: Path
    lines: list[str] = field(default_factory=list)


def metrics_step(features: FeaturesArtifact, settings: EvaluationSettings, out_dir: Path, *,
                 device: torch.device | str | None = None) -> tuple[MetricsArtifact, MetricsReport]:
    """mAP, CMC and mINP of the fine-tuned features (plain and re-ranked) and of the frozen-CLIP
    baseline, through :class:`~reid_pipeline.evaluation.metrics.ReIDEvaluator`; writes
    ``metrics.json``, ``cmc.png`` and ``rank_list.png`` into ``out_dir`` only."""
    tensors, meta = load_tensors(features.features)
    pids = {s: tensors[f"{s}_pids"].numpy() for s in ("query", "gallery")}
    cams = {s: tensors[f"{s}_camids"].numpy() for s in ("query", "gallery")}
    results: dict[str, dict[str, Any]] = {}
    for prefix, names, rerank in (("", ("query", "gallery"), False), ("reranked_", ("query", "gallery"), True),
                                  ("baseline_", ("baseline_query", "baseline_gallery"), False)):
        if rerank and not settings.rerank:
            continue
        evaluator = ReIDEvaluator(max_rank=settings.max_rank, rerank=rerank, k1=settings.k1, k2=settings.k2,
                                  lambda_value=settings.lambda_value, device=device)
        for split, name in zip(("query", "gallery"), names):
            evaluator.process(tensors[name], pids[split], cams[split], split)
        results[prefix] = evaluator.evaluate()
    metrics: dict[str, float] = {}
    lines = []
    for prefix, res in results.items():
        metrics.update(_summary(prefix, res))
        lines.append(f"{prefix.rstrip('_') or 'fine-tuned'}: mAP {res['mAP']:.4f}, rank-1 {res['rank-1']:.4f}, "
                     f"mINP {res['mINP']:.4f} over {res['num_valid_queries']} queries")
    cmc_png = plot_cmc({(k.rstrip("_") or "fine-tuned"): v["cmc"] for k, v in results.items()}, out_dir / "cmc.png")
    from reid_pipeline.evaluation import pairwise_distance

    dist = pairwise_distance(tensors["query"], tensors["gallery"]).cpu().numpy()
    ranks_png = plot_rank_list(meta["query_paths"], meta["gallery_paths"], dist, pids["query"], pids["gallery"],
                               cams["query"], cams["gallery"], root=meta["root"], out_path=out_dir / "rank_list.png",
                               num_queries=settings.rank_list_queries)
    record = {**metrics, "num_query": int(len(pids["query"])), "num_gallery": int(len(pids["gallery"])),
              "cmc": {k or "fine-tuned": np.asarray(v["cmc"]).tolist() for k, v in results.items()},
              "features": features.features, "feature_precision": features.precision, "settings": settings.model_dump()}
    metrics_file = write_json(out_dir / "metrics.json", record)
    artifact = MetricsArtifact(artifact_dir=str(out_dir), metrics_file=str(metrics_file), metrics=metrics,
                               features=features.features)
    report = MetricsReport(results=results, num_query=int(len(pids["query"])), num_gallery=int(len(pids["gallery"])),
                           cmc_png=Path(cmc_png), rank_list_png=Path(ranks_png), lines=lines)
    return artifact, report


@dataclass
class CrossDomainReport:
    """What :func:`cross_domain_step` measured: one row per (train, test) pair, and the heatmap."""

    table: pd.DataFrame
    heatmap_png: Path


def cross_domain_step(encoders: Mapping[str, EncoderArtifact], manifests: Mapping[str, ManifestArtifact],
                      spec: DeviceSpec, out_dir: Path, *, cache_dir: Path, batch_size: int = 128, max_rank: int = 50,
                      log: StepLog = _quiet) -> tuple[CrossDomainArtifact, CrossDomainReport]:
    """Every encoder (trained on the dataset it is keyed by) evaluated on every dataset's query × gallery.

    The train × test matrices of mAP and rank-1 (no re-ranking; the diagonal is in-domain) go into
    ``cross_domain.json`` and a heatmap ``cross_domain.png`` in ``out_dir``. An SIE encoder uses its
    camera embedding in-domain only: other datasets' camera ids mean other cameras, so there it sees
    camera 0 for every image (the embedding is still added, as at training time).
    """
    if not encoders or not manifests:
        raise ValueError(f"cross-domain evaluation needs at least one encoder and one dataset (encoders: "
                         f"{sorted(encoders) or 'none'}; datasets: {sorted(manifests) or 'none'})")
    train_names, test_names = sorted(encoders), sorted(manifests)
    frames = {name: read_manifest(manifests[name]) for name in test_names}
    records = []
    for train in train_names:
        encoder = encoders[train]
        clip_model, _ = load_frozen_clip(encoder.clip)
        model, _ = load_reid_model(encoder.weights, clip_model)
        transform = _test_transform(encoder.clip)
        for test in test_names:
            evaluator = ReIDEvaluator(max_rank=max_rank, rerank=False, device=spec.device)
            for split in ("query", "gallery"):
                rows = split_rows(frames[test], split)
                cams = None
                if model.num_cameras:
                    cams = rows.camid.to_numpy() if test == train else np.zeros(len(rows), dtype=np.int64)
                feats = extract_features(model, image_cache(manifests[test], rows, cache_dir, log), None, transform, spec,
                                         batch_size, cam_ids=cams)
                evaluator.process(feats, rows.pid.to_numpy(), rows.camid.to_numpy(), split)
            result = evaluator.evaluate()
            records.append({"train": train, "test": test, "in_domain": train == test, "mAP": float(result["mAP"]),
                            "rank-1": float(result["rank-1"]), "mINP": float(result["mINP"]),
                            "num_valid_queries": int(result["num_valid_queries"])})
            log(f"trained on {train}, tested on {test}: mAP {result['mAP']:.4f}, rank-1 {result['rank-1']:.4f}")
    table = pd.DataFrame.from_records(records)
    grids = {metric: table.pivot(index="train", columns="test", values=metric).loc[train_names, test_names].to_numpy()
             for metric in ("mAP", "rank-1")}
    heatmap = plot_cross_domain(grids, train_names, test_names, out_dir / "cross_domain.png")
    matrix_file = write_json(out_dir / "cross_domain.json", {
        "train": train_names, "test": test_names, **{k: v.tolist() for k, v in grids.items()}, "pairs": records,
        "encoders": {k: encoders[k].weights for k in train_names}, "manifests": {k: manifests[k].manifest for k in test_names},
    })
    artifact = CrossDomainArtifact(artifact_dir=str(out_dir), matrix_file=str(matrix_file), train_datasets=train_names,
                                   test_datasets=test_names, mAP=grids["mAP"].tolist(), rank1=grids["rank-1"].tolist(),
                                   encoder_weights={k: encoders[k].weights for k in train_names})
    return artifact, CrossDomainReport(table=table, heatmap_png=Path(heatmap))
