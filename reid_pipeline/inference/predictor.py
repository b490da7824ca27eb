"""``ReIDPredictor``: a fine-tuned encoder loaded from disk, turning images into ReID features.

``ReIDPredictor.load(path)`` accepts

* a ``visual_encoder`` artefact folder (its ``descriptor.json`` is an
  :class:`~reid_pipeline.artifacts.EncoderArtifact`),
* the encoder's ``.safetensors`` file (its JSON sidecar carries ``"clip"``: a
  :class:`~reid_pipeline.artifacts.ClipRef`, and ``"model"``), or
* an ``.onnx`` file written by :func:`reid_pipeline.inference.export_onnx` (run through onnxruntime;
  no CLIP and no PyTorch model are loaded).

The CLIP the encoder was fine-tuned from is reloaded from ``ClipRef.source`` (or ``clip=`` when the
weights moved) and refused unless its sha256 is the recorded one.

:meth:`ReIDPredictor.extract` runs *exactly* the evaluation's code path: images are decoded to
uint8 CHW (as :class:`~reid_pipeline.data.cache.ImageCache` does), put in an in-memory
``ImageCache`` one batch at a time and passed to
:func:`~reid_pipeline.training.extract.extract_features` with the model's
:class:`~reid_pipeline.data.transforms.TestTransform`; the result is L2-normalised with the same
``torch.nn.functional.normalize`` the evaluation's distance uses. On the CPU the features are
therefore bit-identical to ``normalize(extract_features(...))`` over an ImageCache of the same images
in the same batches (``reid_pipeline_tests/test_inference.py`` checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from reid_pipeline.artifacts import DESCRIPTOR_FILE, ClipRef, EncoderArtifact, load_descriptor
from reid_pipeline.data.cache import ImageCache, ImageDecodeError, decode_image
from reid_pipeline.data.transforms import TestTransform, normalization_for
from reid_pipeline.device import DeviceSpec, resolve_device
from reid_pipeline.evaluation.distance import normalize
from reid_pipeline.model.clip_loader import ClipWeightsError, load_clip
from reid_pipeline.model.reid_model import ReIDModel, load_reid_model
from reid_pipeline.storage import CheckpointError, read_json, sidecar_path, tensors_fingerprint
from reid_pipeline.training.extract import extract_features

__all__ = [
    "ImageInput",
    "ImageFailure",
    "Extraction",
    "UnreadableImagesError",
    "EncoderMismatchError",
    "ReIDPredictor",
    "encoder_fingerprint",
    "as_uint8_chw",
]

#: One image: a path, a PIL image, a uint8 HWC (or HW) array, or a CHW tensor (uint8, or float in [0, 1]).
ImageInput = Any

ONNX_SIDECAR_FORMAT = "reid_pipeline.onnx_encoder"


class UnreadableImagesError(ValueError):
    """Some images could not be read; ``failures`` lists each (index, name, reason)."""

    def __init__(self, failures: Sequence["ImageFailure"], total: int) -> None:
        self.failures = list(failures)
        lines = [f"  {f.name}: {f.reason}" for f in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more")
        super().__init__(
            f"{len(self.failures)} of {total} image(s) could not be read:\n" + "\n".join(lines)
            + "\n(ReIDPredictor.extract_report() extracts the others and reports these)"
        )


class EncoderMismatchError(ValueError):
    """Features or an index made by one encoder were used with another."""


@dataclass(frozen=True)
class ImageFailure:
    index: int
    name: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "reason": self.reason}


@dataclass
class Extraction:
    """Result of :meth:`ReIDPredictor.extract_report`: features of the readable images only.

    ``features[i]`` belongs to input ``indices[i]`` (named ``names[i]``); every other input is in
    ``failures`` with the reason it could not be read.
    """

    features: torch.Tensor
    indices: list[int]
    names: list[str]
    failures: list[ImageFailure] = field(default_factory=list)


def _name_of(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if isinstance(item, Image.Image) and getattr(item, "filename", ""):
        return str(item.filename)
    return f"<image {index}>"


def as_uint8_chw(item: ImageInput) -> torch.Tensor:
    """One image as a uint8 ``(3, H, W)`` CPU tensor, decoded exactly as the ImageCache decodes files.

    Paths: :func:`~reid_pipeline.data.cache.decode_image` (PIL → RGB). PIL images: ``convert("RGB")``.
    Arrays: uint8 ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped, as PIL's
    RGBA → RGB). Tensors: ``(3, H, W)`` or ``(1, H, W)``, uint8 or float in [0, 1] (× 255, rounded).
    Raises ``FileNotFoundError``, :class:`~reid_pipeline.data.cache.ImageDecodeError`,
    ``TypeError`` or ``ValueError`` saying what was expected.
    """
    if isinstance(item, (str, os.PathLike)):
        return decode_image(item)
    if isinstance(item, Image.Image):
        arr = np.asarray(item.convert("RGB"))
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise ValueError(f"image array has dtype {item.dtype}, expected uint8 (0..255) in HWC order")
        if item.ndim == 2:
            item = item[:, :, None]
        if item.ndim != 3 or item.shape[2] not in (1, 3, 4):
            raise ValueError(f"image array has shape {item.shape}, expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
        if item.shape[2] == 1:
            item = np.repeat(item, 3, axis=2)
        arr = np.ascontiguousarray(item[:, :, :3].transpose(2, 0, 1))
        return torch.from_numpy(arr)
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu()
        if t.dim() != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"image tensor has shape {tuple(t.shape)}, expected (3, H, W) or (1, H, W)")
        if t.is_floating_point():
            lo, hi = float(t.min()), float(t.max())
            if lo < 0.0 or hi > 1.0:
                raise ValueError(f"float image tensor has values in [{lo:.3g}, {hi:.3g}], expected [0, 1] (or pass uint8)")
            t = (t * 255.0).round_().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ValueError(f"image tensor has dtype {t.dtype}, expected uint8 or a float in [0, 1]")
        if t.shape[0] == 1:
            t = t.expand(3, -1, -1)
        return t.contiguous()
    raise TypeError(
        f"unsupported image type {type(item).__name__}: pass a path, a PIL image, a uint8 HWC array or a CHW tensor"
    )


def _expand_inputs(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """A list of single images; one image, a (B, 3, H, W) tensor or a (B, H, W, 3) uint8 array are split."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, torch.Tensor):
        return list(images) if images.dim() == 4 else [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def encoder_fingerprint(weights: str, transform: TestTransform, arch: str) -> str:
    """sha256 over the encoder's tensors fingerprint and its test transform: what features depend on."""
    payload = {
        "weights": weights,
        "arch": arch,
        "input_size": list(transform.size),
        "mean": list(transform.mean),
        "std": list(transform.std),
        "interpolation": transform.interpolation,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _resolve_encoder(path: Path) -> tuple[Path, ClipRef, dict]:
    """(weights file, ClipRef, sidecar meta) for an artefact folder or its safetensors file."""
    if path.is_dir() and not (path / DESCRIPTOR_FILE).is_file() and (path / "visual_encoder.safetensors").is_file():
        path = path / "visual_encoder.safetensors"  # a folder without its descriptor: the weights' sidecar says it all
    if path.is_dir():
        if not (path / DESCRIPTOR_FILE).is_file():
            raise CheckpointError(f"{path}: folder has no {DESCRIPTOR_FILE}; expected a visual_encoder artefact folder")
        desc = load_descriptor(path, EncoderArtifact)
        weights = Path(desc.weights)
        if not weights.is_absolute():
            weights = path / weights
        meta = read_json(sidecar_path(weights))
        return weights, desc.clip, meta
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"{path}: expected a visual_encoder artefact folder, its .safetensors weights or an exported .onnx file"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: encoder weights not found")
    meta = read_json(sidecar_path(path))
    clip = meta.get("clip")
    try:
        ref = ClipRef.model_validate(clip)
    except Exception as exc:
        raise CheckpointError(
            f"{sidecar_path(path)}: its 'clip' section does not describe the CLIP to reload (got {clip!r}; "
            f"expected a ClipRef with source, sha256, arch, input_size, stride): {exc}"
        ) from None
    return path, ref, meta


class ReIDPredictor:
    """Images → L2-normalised ReID test features, with a PyTorch model or an ONNX session.

    Build it with :meth:`load` (from disk) or :meth:`from_model` (an in-memory :class:`ReIDModel`).
    """

    def __init__(
        self,
        *,
        transform: TestTransform,
        fingerprint: str,
        feature_dim: int,
        arch: str,
        num_cameras: int = 0,
        model: ReIDModel | None = None,
        onnx_session: Any = None,
        device_spec: DeviceSpec | None = None,
        batch_size: int = 64,
        source: str | None = None,
        info: dict | None = None,
    ) -> None:
        if (model is None) == (onnx_session is None):
            raise ValueError("ReIDPredictor needs exactly one of model= (PyTorch) or onnx_session= (onnxruntime)")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.transform = transform
        self.fingerprint = fingerprint
        self.feature_dim = int(feature_dim)
        self.arch = arch
        self.num_cameras = int(num_cameras)
        self.model = model.eval() if model is not None else None
        self.onnx_session = onnx_session
        self.backend = "torch" if model is not None else "onnx"
        self.device_spec = device_spec or resolve_device("cpu", "fp32")
        if self.backend == "onnx" and self.device_spec.device.type != "cpu":
            raise ValueError("the onnx backend runs on the CPU (onnxruntime's CPU provider); use device='cpu'")
        self.batch_size = int(batch_size)
        self.source = source
        self.info = dict(info or {})
        if self.model is not None:
            self.model.to(self.device_spec.device)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(
        cls,
        model: ReIDModel,
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        source: str | None = None,
        info: dict | None = None,
    ) -> "ReIDPredictor":
        """A predictor around an in-memory :class:`ReIDModel` (its input size and arch give the transform)."""
        if model.input_size is None:
            raise ValueError("the model's visual encoder has no input_resolution: load CLIP with load_clip(input_size=...)")
        mean, std = normalization_for(model.arch)
        transform = TestTransform(model.input_size, mean, std)
        # 0-dim tensors (BatchNorm's num_batches_tracked) flattened: tensors_fingerprint views bytes;
        # the shape stays part of the name.
        weights_fp = tensors_fingerprint({f"{k}{list(v.shape)}": v.reshape(-1) for k, v in model.state_tensors().items()})
        return cls(
            transform=transform,
            fingerprint=encoder_fingerprint(weights_fp, transform, model.arch),
            feature_dim=model.test_dim,
            arch=model.arch,
            num_cameras=model.num_cameras,
            model=model,
            device_spec=resolve_device(device, precision),
            batch_size=batch_size,
            source=source,
            info={"weights_fingerprint": weights_fp, **(info or {})},
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        device: str = "auto",
        precision: str = "auto",
        backend: str = "auto",
        clip: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> "ReIDPredictor":
        """Load an encoder artefact folder, its ``.safetensors`` weights, or an exported ``.onnx`` file.

        ``device`` / ``precision``: as for training (``auto``: CUDA with bf16/fp16 autocast when
        present, else the CPU in fp32). ``backend``: ``"torch"``, ``"onnx"`` (the path must be the
        ``.onnx`` file) or ``"auto"`` (by the file type). ``clip``: where the CLIP weights are now,
        if not at the recorded ``ClipRef.source`` (the sha256 is checked either way).
        """
        path = Path(path)
        if backend not in ("auto", "torch", "onnx"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'onnx', got {backend!r}")
        is_onnx = path.suffix == ".onnx"
        if backend == "onnx" and not is_onnx:
            raise ValueError(f"{path}: backend='onnx' needs the .onnx file written by export_onnx (reid-search export)")
        if backend == "torch" and is_onnx:
            raise ValueError(f"{path}: an .onnx file runs with backend='onnx'; pass the encoder folder for PyTorch")
        if is_onnx:
            return cls._load_onnx(path, device=device, batch_size=batch_size)
        weights, ref, meta = _resolve_encoder(path)
        source = Path(clip) if clip is not None else Path(ref.source)
        try:
            clip_model, loaded = load_clip(str(source), input_size=tuple(ref.input_size), stride=ref.stride)
        except ClipWeightsError as exc:
            raise ClipWeightsError(
                f"{weights}: cannot reload the CLIP it was fine-tuned from ({exc}); pass clip=PATH if the weights moved"
            ) from exc
        if loaded.sha256 != ref.sha256:
            raise ClipWeightsError(
                f"{source}: sha256 {loaded.sha256[:12]}… is not the CLIP {weights.name} was fine-tuned from "
                f"({ref.name}, sha256 {ref.sha256[:12]}…)"
            )
        model, meta = load_reid_model(weights, clip_model)
        del clip_model
        info = {
            "weights": str(weights),
            "clip": ref.model_dump(mode="json"),
            "training_precision": meta.get("precision"),
            "label_to_pid_len": len(meta.get("label_to_pid") or []),
        }
        return cls.from_model(model, device=device, precision=precision, batch_size=batch_size,
                              source=str(path), info=info)

    @classmethod
    def _load_onnx(cls, path: Path, *, device: str, batch_size: int) -> "ReIDPredictor":
        import onnxruntime as ort

        if not path.is_file():
            raise CheckpointError(f"{path}: ONNX file not found")
        meta = read_json(sidecar_path(path))
        if meta.get("format") != ONNX_SIDECAR_FORMAT:
            raise CheckpointError(f"{sidecar_path(path)}: not the sidecar of a reid_pipeline ONNX encoder")
        spec = resolve_device("cpu" if device == "auto" else device, "fp32")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        transform = TestTransform(tuple(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]), meta["interpolation"])
        return cls(
            transform=transform,
            fingerprint=meta["fingerprint"],
            feature_dim=int(meta["feature_dim"]),
            arch=meta["arch"],
            num_cameras=int(meta.get("num_cameras") or 0),
            onnx_session=session,
            device_spec=spec,
            batch_size=batch_size,
            source=str(path),
            info={"onnx": str(path), "opset": meta.get("opset"), "exported_from": meta.get("source")},
        )

    # ------------------------------------------------------------------ extraction

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for index sidecars, logs and metadata."""
        return {
            "fingerprint": self.fingerprint,
            "backend": self.backend,
            "arch": self.arch,
            "feature_dim": self.feature_dim,
            "num_cameras": self.num_cameras,
            "input_size": list(self.transform.size),
            "device": str(self.device_spec.device),
            "precision": self.device_spec.precision,
            "source": self.source,
            **self.info,
        }

    def _forward_fn(self) -> torch.nn.Module | Callable[..., torch.Tensor]:
        if self.model is not None:
            return self.model
        session = self.onnx_session
        names = [i.name for i in session.get_inputs()]

        def run(x: torch.Tensor, cams: torch.Tensor | None = None) -> torch.Tensor:
            feeds = {names[0]: x.detach().cpu().numpy()}
            if cams is not None:
                feeds[names[1]] = cams.detach().cpu().numpy().astype(np.int64)
            return torch.from_numpy(session.run(None, feeds)[0])

        return run

    def _check_cams(self, camids: Any, n: int) -> np.ndarray | None:
        if self.num_cameras == 0:
            return None
        if camids is None:
            raise ValueError(
                f"this encoder uses SIE over {self.num_cameras} cameras: pass camids= (0-based camera ids), one per image"
            )
        cams = np.asarray(camids, dtype=np.int64).reshape(-1)
        if cams.size != n:
            raise ValueError(f"camids has {cams.size} entries for {n} images")
        bad = cams[(cams < 0) | (cams >= self.num_cameras)]
        if bad.size:
            raise ValueError(f"camera id {int(bad[0])} out of range: the encoder was trained on {self.num_cameras} cameras")
        return cams

    def extract_report(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        camids: Any = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        num_threads: int = 4,
    ) -> Extraction:
        """Features of every readable image; the unreadable ones are listed in ``failures``.

        Images are decoded ``batch_size`` at a time in a thread pool (the next batch is decoded
        while the current one runs through the model). ``progress(done, total)`` after each batch.
        """
        items = _expand_inputs(images)
        total = len(items)
        cams = self._check_cams(camids, total)
        bs = int(batch_size or self.batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        fn = self._forward_fn()

        def decode(start: int) -> tuple[list[int], list[torch.Tensor], list[ImageFailure]]:
            ok, imgs, bad = [], [], []
            for i in range(start, min(total, start + bs)):
                try:
                    imgs.append(as_uint8_chw(items[i]))
                    ok.append(i)
                except (FileNotFoundError, ImageDecodeError, OSError, ValueError, TypeError) as exc:
                    bad.append(ImageFailure(i, _name_of(items[i], i), str(exc)))
            return ok, imgs, bad

        chunks: list[torch.Tensor] = []
        indices: list[int] = []
        failures: list[ImageFailure] = []
        starts = list(range(0, total, bs))
        with ThreadPoolExecutor(max_workers=max(1, int(num_threads))) as pool:
            pending = pool.submit(decode, starts[0]) if starts else None
            for n, _ in enumerate(starts):
                ok, imgs, bad = pending.result()
                pending = pool.submit(decode, starts[n + 1]) if n + 1 < len(starts) else None
                failures.extend(bad)
                if imgs:
                    cache = ImageCache.from_tensors(imgs)
                    cam_b = cams[ok] if cams is not None else None
                    feats = extract_features(fn, cache, None, self.transform, self.device_spec, bs, cam_ids=cam_b)
                    chunks.append(feats)
                    indices.extend(ok)
                if progress is not None:
                    progress(min(total, starts[n] + bs), total)
        if chunks:
            raw = torch.cat(chunks)
            if raw.shape[1] != self.feature_dim:
                raise ValueError(f"the encoder returned {raw.shape[1]}-d features, expected {self.feature_dim}")
            feats = normalize(raw)
        else:
            feats = torch.zeros(0, self.feature_dim)
        return Extraction(feats, indices, [_name_of(items[i], i) for i in indices], failures)

    def extract(
        self,
        images: ImageInput | Iterable[ImageInput],
        *,
        camids: Any = None,
        batch_size: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """L2-normalised test features ``(N, D)`` (float32, CPU), one row per input image, in order.

        Raises :class:`UnreadableImagesError` naming every image that could not be read (after
        trying all of them); :meth:`extract_report` returns the others' features instead.
        """
        result = self.extract_report(images, camids=camids, batch_size=batch_size, progress=progress)
        if result.failures:
            raise UnreadableImagesError(result.failures, len(result.indices) + len(result.failures))
        return result.features

    def __repr__(self) -> str:
        return (f"ReIDPredictor(backend={self.backend!r}, arch={self.arch!r}, dim={self.feature_dim}, "
                f"input={self.transform.size}, device={self.device_spec.device}, fingerprint={self.fingerprint[:12]})")
