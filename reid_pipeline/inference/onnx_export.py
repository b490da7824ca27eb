"""Export the fine-tuned image encoder to ONNX and check it against PyTorch with onnxruntime.

The graph is the encoder's eval forward followed by the L2 normalisation: input ``images``
(float32 ``(batch, 3, H, W)``, already through the model's test transform), optional ``cam_ids``
(int64 ``(batch,)``, only for an encoder trained with SIE), output ``features`` (float32
``(batch, D)``, unit rows). The batch axis is dynamic. It is written with PyTorch's TorchScript-based
exporter (``torch.onnx.export(..., dynamo=False)``) at opset :data:`DEFAULT_OPSET`.

Beside ``encoder.onnx`` a JSON sidecar ``encoder.json`` records everything
:meth:`ReIDPredictor.load("encoder.onnx") <reid_pipeline.inference.ReIDPredictor.load>` needs (test
transform, feature dimension, the PyTorch encoder's fingerprint — so an index built with either
backend serves the other) and the parity report. The ONNX file is moved into place only after the
check passed: max absolute difference of the L2-normalised features at most ``atol`` (1e-4) on the
check images, and, when a gallery is given, the same top-k lists (order included) — where the two
lists differ, only between items whose PyTorch distances are closer than the features' rounding can
move a distance (``4·(|Δq| + |Δg|)``, a few 1e-7 for fp32): numerical ties. The report gives both
``top_k_identical`` (strict) and ``top_k_identical_up_to_ties`` (the pass criterion).
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from reid_pipeline.storage import sidecar_path, write_json

from .index import GalleryIndex, _decode
from .predictor import ONNX_SIDECAR_FORMAT, ImageInput, ReIDPredictor

__all__ = ["DEFAULT_OPSET", "OnnxParityError", "export_onnx"]

DEFAULT_OPSET = 17


class OnnxParityError(RuntimeError):
    """The exported graph does not reproduce the PyTorch features within tolerance."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


class _EncoderGraph(nn.Module):
    """What is exported: the eval feature, L2-normalised."""

    def __init__(self, model: nn.Module, sie: bool) -> None:
        super().__init__()
        self.model = model
        self.sie = sie

    def forward(self, images: torch.Tensor, cam_ids: torch.Tensor | None = None) -> torch.Tensor:
        feats = self.model(images, cam_ids) if self.sie else self.model(images)
        return nn.functional.normalize(feats, p=2.0, dim=1)


def _check_images(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    """Seeded smooth random images of varied sizes (used only when no real images are given)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = int(size[0] * (0.5 + (i % 3) * 0.25)), int(size[1] * (0.5 + (i % 2) * 0.5))
        low = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        out.append(np.kron(low, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w].copy())
    return out


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_onnx(
    source: ReIDPredictor | str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    check_images: Sequence[ImageInput] | None = None,
    gallery_images: Sequence[ImageInput] | None = None,
    query_images: Sequence[ImageInput] | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    top_k: int = 10,
    batch_size: int = 16,
    clip: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Export ``source`` (a PyTorch :class:`ReIDPredictor`, or an encoder folder / safetensors file)
    to ``out_path`` (``.onnx``) with its JSON sidecar; returns the report (also in the sidecar).

    Parity: features of ``check_images`` (default: the first 16 of ``gallery_images``, else 8
    generated images — recorded as ``check_source``) from onnxruntime and PyTorch, batched by
    ``batch_size`` so that a full and a partial batch run; with ``gallery_images`` also the
    top-``top_k`` of ``query_images`` (default: the first 10 gallery images) over that gallery with
    either backend's features. Raises :class:`OnnxParityError` (nothing written) when the max
    absolute difference exceeds ``atol`` or a top-k list differs beyond numerical ties.
    """
    import onnx
    import onnxruntime as ort

    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"{out_path}: the ONNX file name must end in .onnx")
    if isinstance(source, ReIDPredictor):
        predictor = source
    else:
        predictor = ReIDPredictor.load(source, device="cpu", precision="fp32", backend="torch", clip=clip)
    if predictor.model is None:
        raise ValueError("export_onnx needs a PyTorch predictor (backend='torch'), not an ONNX one")
    if predictor.device_spec.device.type != "cpu" or predictor.device_spec.amp_dtype is not None:
        predictor = ReIDPredictor.from_model(copy.deepcopy(predictor.model).cpu().float(), device="cpu", precision="fp32",
                                             source=predictor.source, info=predictor.info)
    model = copy.deepcopy(predictor.model).cpu().float().eval()
    sie = model.num_cameras > 0
    graph = _EncoderGraph(model, sie).eval()
    h, w = predictor.transform.size
    dummy = (torch.zeros(2, 3, h, w),) + ((torch.zeros(2, dtype=torch.int64),) if sie else ())
    input_names = ["images"] + (["cam_ids"] if sie else [])
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, "features"]}

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, dummy, str(tmp), input_names=input_names, output_names=["features"],
                              dynamic_axes=dynamic_axes, opset_version=int(opset), dynamo=False,
                              do_constant_folding=True)
        onnx.checker.check_model(str(tmp))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(tmp), sess_options=opts, providers=["CPUExecutionProvider"])
        onnx_pred = ReIDPredictor(
            transform=predictor.transform, fingerprint=predictor.fingerprint, feature_dim=predictor.feature_dim,
            arch=predictor.arch, num_cameras=predictor.num_cameras, onnx_session=session, batch_size=batch_size,
        )
        report = _parity(predictor, onnx_pred, check_images, gallery_images, query_images, atol, top_k, batch_size)
        report.update({"opset": int(opset), "onnx_path": str(out_path), "bytes": tmp.stat().st_size})
        if not report["passed"]:
            raise OnnxParityError(
                f"ONNX export of {predictor.source or 'the encoder'} failed its parity check: max abs diff "
                f"{report['max_abs_diff']:.3g} (limit {atol:g}), top-{top_k} identical up to numerical ties: "
                f"{report.get('top_k_identical_up_to_ties')} (largest distance gap {report.get('max_rank_distance_gap')})",
                report,
            )
        sidecar = {
            "format": ONNX_SIDECAR_FORMAT,
            "fingerprint": predictor.fingerprint,
            "arch": predictor.arch,
            "feature_dim": predictor.feature_dim,
            "num_cameras": predictor.num_cameras,
            "input_size": list(predictor.transform.size),
            "mean": list(predictor.transform.mean),
            "std": list(predictor.transform.std),
            "interpolation": predictor.transform.interpolation,
            "opset": int(opset),
            "inputs": {"images": ["batch", 3, h, w], **({"cam_ids": ["batch"]} if sie else {})},
            "outputs": {"features": ["batch", predictor.feature_dim]},
            "output_normalized": True,
            "source": predictor.source,
            "encoder": {k: v for k, v in predictor.info.items() if k in ("weights", "clip", "weights_fingerprint")},
            "versions": _versions(),
            "parity": report,
        }
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(sidecar_path(out_path), sidecar)
    report["sidecar"] = str(sidecar_path(out_path))
    return report


def _parity(
    torch_pred: ReIDPredictor,
    onnx_pred: ReIDPredictor,
    check_images: Sequence[ImageInput] | None,
    gallery_images: Sequence[ImageInput] | None,
    query_images: Sequence[ImageInput] | None,
    atol: float,
    top_k: int,
    batch_size: int,
) -> dict[str, Any]:
    if check_images is not None:
        checks, check_source = list(check_images), "given images"
    elif gallery_images:
        checks, check_source = list(gallery_images)[:16], "first gallery images"
    else:
        checks, check_source = _check_images(8, torch_pred.transform.size, seed=0), "generated images (no real images given)"
    if not checks:
        raise ValueError("export_onnx: no images to check the export on")
    cams = np.zeros(len(checks), dtype=np.int64) if torch_pred.num_cameras else None
    # a batch size below the count makes a full and a partial batch: the dynamic axis is exercised
    bs = max(1, min(int(batch_size), len(checks) - 1)) if len(checks) > 1 else 1
    ref = torch_pred.extract_report(checks, camids=cams, batch_size=bs)
    got = onnx_pred.extract_report(checks, camids=cams, batch_size=bs)
    if ref.failures:
        raise ValueError(f"export_onnx: check images unreadable: {[f.name for f in ref.failures][:5]}")
    diff = float((ref.features - got.features).abs().max())
    report: dict[str, Any] = {
        "check_images": len(checks), "check_source": check_source, "check_batch_size": bs,
        "max_abs_diff": diff, "atol": float(atol),
    }
    passed = diff <= atol
    if gallery_images:
        gallery = list(gallery_images)
        g_cams = np.zeros(len(gallery), dtype=np.int64) if torch_pred.num_cameras else None
        g_ref = torch_pred.extract_report(gallery, camids=g_cams, batch_size=batch_size)
        g_got = onnx_pred.extract_report(gallery, camids=g_cams, batch_size=batch_size)
        queries = list(query_images) if query_images is not None else gallery[:10]
        q_cams = np.zeros(len(queries), dtype=np.int64) if torch_pred.num_cameras else None
        q_ref = torch_pred.extract(queries, camids=q_cams, batch_size=batch_size)
        q_got = onnx_pred.extract(queries, camids=q_cams, batch_size=batch_size)
        k = min(int(top_k), len(g_ref.indices))
        ref_index = GalleryIndex.from_features(g_ref.features, fingerprint="torch")
        keys_ref = ref_index._exact_keys(q_ref, k, None)
        idx_ref = _decode(keys_ref)[1]
        idx_got = _decode(GalleryIndex.from_features(g_got.features, fingerprint="onnx")._exact_keys(q_got, k, None))[1]
        differing = (idx_ref != idx_got).any(dim=1)
        # A swap is a numerical tie when PyTorch's own distances of the two lists' items at each rank
        # differ by less than the features' rounding can move a distance: |Δ|q-g|²| <= 4(|Δq| + |Δg|).
        dq = float((q_ref - q_got).norm(dim=1).max())
        dg = float((g_ref.features - g_got.features).norm(dim=1).max())
        tie_tol = 4.0 * (dq + dg)
        d_ref = ref_index.distances(q_ref)
        gap = (d_ref.gather(1, idx_got) - d_ref.gather(1, idx_ref)).abs()
        beyond_ties = int((gap > tie_tol).any(dim=1).sum())
        report.update({
            "gallery_images": len(g_ref.indices), "queries": len(queries), "top_k": k,
            "top_k_identical": bool(not differing.any()), "queries_with_different_top_k": int(differing.sum()),
            "top_k_identical_up_to_ties": beyond_ties == 0, "tie_tolerance": tie_tol,
            "max_rank_distance_gap": float(gap.max()),
            "gallery_max_abs_diff": float((g_ref.features - g_got.features).abs().max()),
        })
        passed = passed and beyond_ties == 0
    report["passed"] = bool(passed)
    return report
