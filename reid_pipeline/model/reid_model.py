"""CLIP-ReID's stage-2 model: a trainable copy of CLIP's image encoder with BNNeck heads.

Features (CLIP-ReID ``model/make_model_clipreid.py``):

* **ViT** (``VisionTransformer`` of openai-clip): ``f_mid`` = class token after block L-1 (width-d,
  no ``ln_post``), ``f_last`` = class token after block L with ``ln_post`` (width-d), ``f_proj`` =
  ``f_last @ proj`` (embed-d). ViT-B/16: 768 / 768 / 512.
* **ResNet** (``ModifiedResNet``): ``f_mid`` = global average of layer 3, ``f_last`` = global
  average of layer 4, ``f_proj`` = the attention-pool token. RN50: 1024 / 2048 / 1024.

BNNecks (``BatchNorm1d``, weight 1, bias 0 and frozen) on ``f_last`` and ``f_proj``; classifiers
``Linear(·, num_classes, bias=False)`` initialised N(0, 0.001) on the BN outputs.

SIE (ViT only): a camera embedding ``cv_embed`` (num_cameras × width, truncated normal std 0.02)
times ``sie_coe`` is added to the class token before the positional embedding. OLP (overlapping
patches) is the loader's ViT stride (``load_clip(..., stride=12)``), nothing to do here.

``forward(x, cam_ids)`` in train mode returns ``([cls_score, cls_score_proj], [f_mid, f_last,
f_proj], f_proj)``; in eval mode the test feature ``cat([f_last, f_proj])`` (pre-BN, not
normalised — the evaluator L2-normalises).

:meth:`ReIDModel.frozen_baseline` wraps the frozen CLIP's own encoder (no copy, no heads) so the
same eval path yields the zero-shot baseline features.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from reid_pipeline.storage import CheckpointError, load_tensors, save_tensors

__all__ = ["ReIDModel", "visual_arch", "save_reid_model", "load_reid_model"]


def visual_arch(visual: nn.Module) -> str:
    """``"vit"`` or ``"resnet"`` for an openai-clip visual encoder."""
    if hasattr(visual, "class_embedding") and hasattr(visual, "transformer"):
        return "vit"
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        return "resnet"
    raise ValueError(f"unsupported CLIP visual encoder {type(visual).__name__}")


class ReIDModel(nn.Module):
    """Image encoder + BNNecks + classifiers; see the module docstring.

    ``clip_model``: a CLIP from :func:`reid_pipeline.model.clip_loader.load_clip` (already adapted
    to the ReID input size). With ``trainable=True`` (default) the visual encoder is deep-copied and
    all its parameters require grad — the CLIP passed in is never modified. ``num_classes=None``
    builds no heads (eval only). ``seed`` drives the head / camera-embedding initialisation through
    a private generator (the global RNG is not touched).
    """

    def __init__(
        self,
        clip_model: nn.Module,
        num_classes: int | None,
        *,
        num_cameras: int = 0,
        sie_coe: float = 3.0,
        trainable: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        visual = clip_model.visual if hasattr(clip_model, "visual") else clip_model
        self.arch = visual_arch(visual)
        if trainable:
            visual = copy.deepcopy(visual)
            for p in visual.parameters():
                p.requires_grad_(True)
        self.visual = visual
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 (or None for an eval-only model), got {num_classes}")
        if int(num_cameras) < 0:
            raise ValueError(f"num_cameras must be >= 0, got {num_cameras}")
        if num_cameras and self.arch != "vit":
            raise ValueError("SIE (camera embedding) applies to ViT backbones only, as in CLIP-ReID; got a ResNet CLIP")
        self.num_classes = int(num_classes) if num_classes is not None else None
        self.num_cameras = int(num_cameras)
        self.sie_coe = float(sie_coe)

        if self.arch == "vit":
            width = int(visual.conv1.out_channels)
            self.mid_dim, self.feat_dim, self.proj_dim = width, width, int(visual.proj.shape[1])
        else:
            self.mid_dim = int(_out_channels(visual.layer3))
            self.feat_dim = int(_out_channels(visual.layer4))
            self.proj_dim = int(visual.attnpool.c_proj.out_features)

        gen = torch.Generator().manual_seed(int(seed))
        self.bottleneck = _bnneck(self.feat_dim)
        self.bottleneck_proj = _bnneck(self.proj_dim)
        if self.num_classes is not None:
            self.classifier = nn.Linear(self.feat_dim, self.num_classes, bias=False)
            self.classifier_proj = nn.Linear(self.proj_dim, self.num_classes, bias=False)
            with torch.no_grad():
                self.classifier.weight.normal_(0.0, 0.001, generator=gen)
                self.classifier_proj.weight.normal_(0.0, 0.001, generator=gen)
        else:
            self.classifier = None
            self.classifier_proj = None
        if self.num_cameras:
            emb = torch.zeros(self.num_cameras, self.feat_dim)
            nn.init.trunc_normal_(emb, std=0.02, generator=gen)
            self.cv_embed = nn.Parameter(emb)
        else:
            self.cv_embed = None
        if not trainable:
            self.visual.eval()

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def frozen_baseline(cls, clip_model: nn.Module) -> "ReIDModel":
        """The frozen CLIP encoder (shared, not copied) with the same eval feature: zero-shot baseline."""
        model = cls(clip_model, None, trainable=False)
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()

    @property
    def test_dim(self) -> int:
        """Dimension of the eval feature ``[f_last ‖ f_proj]``."""
        return self.feat_dim + self.proj_dim

    @property
    def input_size(self) -> tuple[int, int] | None:
        res = getattr(self.visual, "input_resolution", None)
        if isinstance(res, (tuple, list)):
            return int(res[0]), int(res[1])
        return None

    @property
    def stride(self) -> int | None:
        return int(self.visual.conv1.stride[0]) if self.arch == "vit" else None

    def describe(self) -> dict[str, Any]:
        """Architecture facts for a checkpoint sidecar (enough to rebuild with :func:`load_reid_model`)."""
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "num_cameras": self.num_cameras,
            "sie_coe": self.sie_coe,
            "feature_dims": {"mid": self.mid_dim, "last": self.feat_dim, "proj": self.proj_dim, "test": self.test_dim},
            "input_size": list(self.input_size) if self.input_size else None,
            "stride": self.stride,
            "grid_hw": list(getattr(self.visual, "grid_hw", ())) or None,
        }

    # ------------------------------------------------------------------ forward

    def _vit(self, x: torch.Tensor, cam_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.conv1(x.type(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, grid, width)
        cls_tok = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if self.cv_embed is not None:
            if cam_ids is None:
                raise ValueError("this model uses SIE (camera embedding): pass cam_ids to forward()")
            cls_tok = cls_tok + self.sie_coe * self.cv_embed[cam_ids].to(x.dtype)[:, None, :]
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        blocks = v.transformer.resblocks
        x_mid = blocks[:-1](x)
        x_last = blocks[-1](x_mid)
        f_mid = x_mid[0]
        f_last = v.ln_post(x_last[0])
        f_proj = f_last @ v.proj
        return f_mid, f_last, f_proj

    def _resnet(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.visual
        x = x.type(v.conv1.weight.dtype)
        relus = [getattr(v, f"relu{i}", None) or v.relu for i in (1, 2, 3)]
        for conv, bn, act in ((v.conv1, v.bn1, relus[0]), (v.conv2, v.bn2, relus[1]), (v.conv3, v.bn3, relus[2])):
            x = act(bn(conv(x)))
        x = v.avgpool(x)
        x = v.layer2(v.layer1(x))
        x3 = v.layer3(x)
        x4 = v.layer4(x3)
        f_proj = v.attnpool(x4)
        return x3.mean(dim=(2, 3)), x4.mean(dim=(2, 3)), f_proj

    def features(self, x: torch.Tensor, cam_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(f_mid, f_last, f_proj)`` for a normalised image batch."""
        if self.arch == "vit":
            return self._vit(x, cam_ids)
        return self._resnet(x)

    def forward(self, x: torch.Tensor, cam_ids: torch.Tensor | None = None):
        f_mid, f_last, f_proj = self.features(x, cam_ids)
        if not self.training:
            return torch.cat([f_last, f_proj], dim=1)
        if self.classifier is None:
            raise RuntimeError("this ReIDModel has no classifiers (num_classes=None): use it in eval mode")
        feat = self.bottleneck(f_last)
        feat_proj = self.bottleneck_proj(f_proj)
        logits = [self.classifier(feat), self.classifier_proj(feat_proj)]
        return logits, [f_mid, f_last, f_proj], f_proj

    # ------------------------------------------------------------------ checkpoints

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer under stable names (``visual.*``, ``bottleneck.*``, ...)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load :meth:`state_tensors` output; clear errors for missing, extra or mis-shaped tensors."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise CheckpointError(
                f"{source}: does not match this ReIDModel — missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
            )
        for name, t in tensors.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise CheckpointError(
                    f"{source}: tensor {name!r} has shape {tuple(t.shape)}, the model expects {tuple(own[name].shape)}"
                )
        self.load_state_dict(dict(tensors), strict=True)


def _out_channels(layer: nn.Module) -> int:
    """Output channels of a ResNet stage (its last bottleneck's ``bn3``)."""
    return int(list(layer.children())[-1].bn3.num_features)


def _bnneck(dim: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


def save_reid_model(path: str | os.PathLike, model: ReIDModel, meta: Mapping[str, Any] | None = None) -> Path:
    """Save ``model.state_tensors()`` as safetensors + JSON sidecar (``describe()`` under ``"model"``)."""
    sidecar = dict(meta or {})
    sidecar["model"] = model.describe()
    return save_tensors(path, model.state_tensors(), sidecar)


def load_reid_model(
    path: str | os.PathLike, clip_model: nn.Module, device: str | torch.device = "cpu"
) -> tuple[ReIDModel, dict]:
    """Rebuild a :class:`ReIDModel` from :func:`save_reid_model` output around ``clip_model``'s encoder.

    ``clip_model`` must be loaded with the same input size and stride as at training time.
    """
    tensors, meta = load_tensors(path)
    info = meta.get("model")
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: sidecar has no 'model' section; not a ReIDModel checkpoint")
    model = ReIDModel(
        clip_model, info.get("num_classes"), num_cameras=int(info.get("num_cameras") or 0),
        sie_coe=float(info.get("sie_coe", 3.0)),
    )
    if model.arch != info.get("arch"):
        raise CheckpointError(f"{path}: saved for a {info.get('arch')} encoder, the given CLIP is {model.arch}")
    if info.get("input_size") and model.input_size and list(model.input_size) != list(info["input_size"]):
        raise CheckpointError(
            f"{path}: trained at input size {info['input_size']}, the given CLIP is adapted to {list(model.input_size)}"
        )
    if info.get("stride") != model.stride:
        raise CheckpointError(f"{path}: trained with ViT stride {info.get('stride')}, the given CLIP has {model.stride}")
    model.load_state_tensors(tensors, source=str(path))
    return model.to(device).eval(), meta
