"""Loading OpenAI CLIP through openai-clip's own ``clip.load`` and adapting it to ReID inputs.

* :func:`load_clip` — a model name (``ViT-B/16``, ``RN50``, aliases such as ``vitb16``/``rn50``) or a
  local checkpoint file → a frozen CLIP whose visual encoder takes ReID-sized images (256×128 by
  default), plus a :class:`ClipInfo` describing it.
* :func:`adapt_visual` — ViT: positional embedding resized bilinearly with the class token kept,
  optional overlapping patches (OLP, stride < patch); ModifiedResNet: attention-pool positional
  embedding resized, last stride 1.
* :func:`save_clip_archive` — save a ``clip.model.CLIP`` as a TorchScript archive in OpenAI's format,
  which ``clip.load`` reads back (the embedded small CLIP of :mod:`reid_pipeline.embedded` uses it).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from reid_pipeline.storage import atomic_write_bytes, file_sha256

__all__ = [
    "ClipWeightsError",
    "ClipInfo",
    "MODEL_ALIASES",
    "import_clip",
    "CHECKPOINT_SUFFIXES",
    "resolve_model_name",
    "resolve_clip_source",
    "weights_stat_fingerprint",
    "cached_weights_path",
    "load_clip",
    "adapt_visual",
    "freeze",
    "save_clip_archive",
    "visual_grid",
]

MODEL_ALIASES = {
    "vitb16": "ViT-B/16",
    "vitb32": "ViT-B/32",
    "vitl14": "ViT-L/14",
    "rn50": "RN50",
    "rn101": "RN101",
}


class ClipWeightsError(ValueError):
    """CLIP weights are missing, corrupt or not a CLIP checkpoint."""


def import_clip():
    """Import openai-clip with its ``pkg_resources`` deprecation warning silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import clip

    return clip


@dataclass(frozen=True)
class ClipInfo:
    """What :func:`load_clip` loaded: enough to describe it in metadata and to check compatibility."""

    name: str
    source: str
    sha256: str
    arch: str  # "vit" or "resnet"
    input_size: tuple[int, int]
    stride: int | None
    patch_size: int | None
    embed_dim: int
    vision_width: int
    text_width: int
    context_length: int
    vocab_size: int
    param_count: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


#: Suffixes that make a CLIP weights value a file path rather than a model name.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".jit", ".tar", ".zip")

_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")


def _normalise_name(text: str) -> str:
    return re.sub(r"[\s\-_/@]", "", text.lower())


def _name_table() -> dict[str, str]:
    """Normalised spelling → openai-clip model name, for every released model and every alias."""
    table = {_normalise_name(n): n for n in import_clip().available_models()}
    table.update(MODEL_ALIASES)
    return table


def _known_names_text() -> str:
    return f"known: {', '.join(import_clip().available_models())}; aliases: {', '.join(MODEL_ALIASES)}"


def resolve_model_name(name_or_path: str) -> str:
    """Map an alias (``vitb16``) or another spelling (``vit-b/16``) to the openai-clip name
    (``ViT-B/16``); leave anything else unchanged."""
    text = str(name_or_path)
    return _name_table().get(_normalise_name(text), text)


def resolve_clip_source(
    spec: str | os.PathLike, base_dir: str | os.PathLike | None = None, *, must_exist: bool = True
) -> str:
    """Decide whether ``spec`` names an openai-clip model or a checkpoint file.

    Returns the canonical model name (``"ViT-B/16"``) or the absolute path of the file. The rules:

    1. A value starting with ``./``, ``../``, ``/`` or ``~`` is a path.
    2. A known model name or alias in any spelling (``ViT-B/16``, ``vit-b/16``, ``vitb16``,
       ``RN50``, ``rn50``) is a name, although it may contain ``/``.
    3. A value ending in a checkpoint suffix (:data:`CHECKPOINT_SUFFIXES`), or that exists on disk,
       is a path.
    4. Anything else is an unknown model name (``ViT-Z/99``): :class:`ClipWeightsError` listing
       the known names.

    Relative paths are taken relative to ``base_dir`` (default: the current directory). With
    ``must_exist`` (default) a path must be an existing file.

    Raises:
        ClipWeightsError: empty value, unknown model name, or (``must_exist``) no such file.
    """
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    text = text.strip()
    if not text:
        raise ClipWeightsError(f"CLIP weights: empty value; give a model name ({_known_names_text()}) or a checkpoint path")
    base = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
    candidate = Path(text).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    is_path = text.startswith(_PATH_PREFIXES)
    if not is_path:
        name = _name_table().get(_normalise_name(text))
        if name is not None:
            return name
        is_path = text.lower().endswith(CHECKPOINT_SUFFIXES) or candidate.exists()
    if not is_path:
        raise ClipWeightsError(
            f"CLIP weights {text!r}: unknown model name ({_known_names_text()}); for a checkpoint file give "
            f"its path, e.g. ./{text.replace('/', '-')}.pt"
        )
    path = candidate.resolve()
    if must_exist:
        if path.is_dir():
            raise ClipWeightsError(f"CLIP weights {text!r}: {path} is a directory, expected a checkpoint file")
        if not path.is_file():
            raise ClipWeightsError(
                f"CLIP weights {text!r}: {path}: no such file (and {text!r} is not a model name; {_known_names_text()})"
            )
    return str(path)


def cached_weights_path(name: str, download_root: str | os.PathLike | None = None) -> Path:
    """Where openai-clip keeps (and looks for) the released weights of model ``name``.

    ``download_root`` defaults to ``~/.cache/clip``; the file name is the one openai-clip derives
    from the release URL (``ViT-B/16`` → ``ViT-B-16.pt``).
    """
    canonical = resolve_model_name(name)
    models = import_clip().clip._MODELS
    if canonical not in models:
        raise ClipWeightsError(f"CLIP weights {name!r}: unknown model name ({_known_names_text()})")
    root = Path(download_root).expanduser() if download_root is not None else Path("~/.cache/clip").expanduser()
    return root / os.path.basename(models[canonical])


_WEIGHTS_FINGERPRINT_VERSION = b"reid_pipeline.clip_weights_fingerprint.v1\n"


def _stat_line(path: Path) -> str:
    st = path.stat()
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"


def weights_stat_fingerprint(spec: str | os.PathLike) -> str:
    """A cheap fingerprint of CLIP weights, one ``stat`` and nothing read: path, size and mtime of the
    file; for a model name, the name and its cached download in ``~/.cache/clip`` when present (the
    first download then changes it). The content check is :class:`ClipInfo`'s ``sha256``.

    Raises:
        FileNotFoundError: a path that is not a file. ClipWeightsError: an unknown model name.
    """
    source = resolve_clip_source(spec, must_exist=False)
    h = hashlib.sha256(_WEIGHTS_FINGERPRINT_VERSION)
    if os.path.isabs(source):
        if not Path(source).is_file():
            raise FileNotFoundError(f"CLIP weights {source}: no such file — set REID_CLIP_WEIGHTS or the reid "
                                    "resource's clip_weights to a checkpoint path or a model name such as ViT-B/16")
        h.update(_stat_line(Path(source)).encode())
        return h.hexdigest()
    h.update(f"model:{source}".encode())
    cached = cached_weights_path(source)
    if cached.is_file():
        h.update(b"\0" + _stat_line(cached).encode())
    return h.hexdigest()


def _clean_message(exc: BaseException | str) -> str:
    """A foreign error message fit to forward: ANSI codes stripped, torch's advice to load with
    ``weights_only=False`` (which would run the file's code) replaced by the reason it refused."""
    text = _ANSI_ESCAPE.sub("", str(exc))
    if "weights_only" in text and "Weights only load failed" in text:
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Please use|\s*Check the documentation|$)", text, re.DOTALL)
        detail = " ".join((m.group(1) if m else "").split()) or "unsupported content"
        return (
            f"it holds pickled Python objects besides tensors ({detail}); it is refused because unpickling "
            "them could run arbitrary code — save model.state_dict() or a TorchScript archive instead"
        )
    text = " ".join(text.split())
    return text if text else type(exc).__name__ if isinstance(exc, BaseException) else ""


def _error_text(exc: BaseException) -> str:
    cleaned = _clean_message(exc)
    return f"{type(exc).__name__}: {cleaned}" if cleaned and cleaned != type(exc).__name__ else type(exc).__name__


_TRUNCATED_ZIP = (
    "a truncated or corrupt zip archive (torch.save / TorchScript format without its end-of-archive "
    "record: probably cut short while copying or downloading)"
)


def _describe_file(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(16)
    if size == 0:
        kind = "an empty file"
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            names = None
        if names is None:
            kind = _TRUNCATED_ZIP
        elif any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            kind = "a TorchScript archive"
        else:
            kind = "a torch.save zip"
    elif head[:4] == b"PK\x03\x04":
        kind = _TRUNCATED_ZIP
    elif head[:1] == b"\x80":
        kind = "a legacy pickle file"
    elif len(head) >= 9 and head[8:9] == b"{":
        kind = "a safetensors file"
    elif head[:4] == b"\x89PNG" or head[:3] == b"\xff\xd8\xff":
        kind = "an image"
    elif head.lstrip()[:1] in (b"<", b"{", b"["):
        kind = "a text file (HTML/JSON/XML — an error page saved by a failed download?)"
    else:
        kind = "an unrecognised file (not a zip archive, pickle, safetensors file or image)"
    return f"{kind} of {size} bytes"


def _looks_corrupt(exc: BaseException) -> bool:
    text = str(exc)
    return any(k in text for k in ("PytorchStreamReader", "zip archive", "central directory", "CRC", "EOF"))


def _check_state_dict(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict):
        raise ClipWeightsError(f"{path}: holds a {type(state).__name__}, expected a CLIP state dict")
    required = ["positional_embedding", "text_projection", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in state]
    if missing or not any(k.startswith("visual.") for k in state):
        sample = ", ".join(sorted(map(str, state))[:6])
        raise ClipWeightsError(
            f"{path}: not OpenAI CLIP weights — missing keys {missing or ['visual.*']}; found keys like: {sample}"
        )
    return state


def _load_named(clip, name: str, download_root: str | None, allow_download: bool) -> tuple[nn.Module, Path]:
    """``clip.load(name)`` from the download root, downloading only when allowed."""
    target = cached_weights_path(name, download_root)
    url = clip.clip._MODELS[name]
    where = (
        f"copy OpenAI's released file {target.name} ({url}) to {target}, or pass download_root / the path "
        "of a local checkpoint instead"
    )
    if not target.is_file() and not allow_download:
        raise ClipWeightsError(
            f"CLIP model {name!r}: its weights are not cached — {target} does not exist and downloads are "
            f"off. To use it offline, {where}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = clip.load(name, device="cpu", jit=False, download_root=str(target.parent))
    except (OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if not target.is_file():
            raise ClipWeightsError(
                f"CLIP model {name!r}: its weights are not cached ({target} does not exist) and downloading them "
                f"failed ({_error_text(exc)}). Without a network, {where}"
            ) from exc
        expected = url.split("/")[-2]
        if file_sha256(target) != expected:
            raise ClipWeightsError(
                f"{target}: the cached weights of CLIP model {name!r} are truncated or corrupt (SHA-256 differs from "
                f"OpenAI's {expected[:12]}…) and could not be replaced ({_error_text(exc)}); {where}"
            ) from exc
        raise ClipWeightsError(
            f"{target}: the cached weights of CLIP model {name!r} could not be loaded ({_error_text(exc)})"
        ) from exc
    return model, target


def _load_file(clip, path: Path) -> tuple[nn.Module, Path]:
    """``clip.load(path)``; plain state-dict files are read with ``weights_only=True`` and built here."""
    what = _describe_file(path)
    if what.startswith(_TRUNCATED_ZIP):
        raise ClipWeightsError(f"{path}: {what}; copy or download the checkpoint again")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, _ = clip.load(str(path), device="cpu", jit=False)
        return model, path
    except (KeyError, AssertionError) as exc:
        # A TorchScript archive whose module is not CLIP.
        try:
            keys = sorted(torch.jit.load(str(path), map_location="cpu").state_dict())[:6]
        except Exception:  # only used to describe the file
            keys = []
        raise ClipWeightsError(
            f"{path}: {what} that is not OpenAI CLIP (missing {_clean_message(exc)}); found keys like: {', '.join(keys)}"
        ) from exc
    except Exception as exc:  # clip.load raises many kinds; re-raised below with context
        first_error = exc
    # clip.load's state-dict fallback re-reads a consumed file object; read plain state dicts ourselves.
    if zipfile.is_zipfile(path) or what.startswith("a legacy pickle"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            if _looks_corrupt(exc):
                raise ClipWeightsError(f"{path}: {what} that is truncated or corrupt ({_error_text(exc)})") from exc
            raise ClipWeightsError(f"{path}: {what} that could not be read as CLIP weights: {_clean_message(exc)}") from exc
        state = _check_state_dict(path, state)
        try:
            model = clip.model.build_model(dict(state)).float()
        except Exception as exc:
            raise ClipWeightsError(f"{path}: CLIP state dict with unexpected shapes ({_error_text(exc)})") from exc
        return model, path
    raise ClipWeightsError(
        f"{path}: {what}; expected an OpenAI CLIP checkpoint (TorchScript archive or state-dict zip) "
        f"— clip.load said: {_error_text(first_error)}"
    ) from first_error


def _clip_load(
    clip, name_or_path: str, download_root: str | None, allow_download: bool = True
) -> tuple[nn.Module, Path]:
    """Load a model name (through the download root) or a checkpoint file."""
    source = resolve_clip_source(name_or_path)
    if source in clip.available_models():
        return _load_named(clip, source, download_root, allow_download)
    return _load_file(clip, Path(source))


def visual_grid(input_size: tuple[int, int], patch: int, stride: int) -> tuple[int, int]:
    """Number of patch rows and columns: ``(H - patch) // stride + 1`` and likewise for width."""
    h, w = input_size
    return (h - patch) // stride + 1, (w - patch) // stride + 1


def _resize_pos(pos: torch.Tensor, old_hw: tuple[int, int], new_hw: tuple[int, int]) -> torch.Tensor:
    cls_tok, grid = pos[:1], pos[1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], dim).to(pos.dtype)
    return torch.cat([cls_tok, grid], dim=0)


def adapt_visual(model: nn.Module, input_size: tuple[int, int] = (256, 128), stride: int | None = None) -> nn.Module:
    """Adapt ``model.visual`` in place to ``input_size`` (H, W) and an optional patch ``stride``.

    ViT: conv stride set to ``stride`` (default: the patch size; smaller = overlapping patches), the
    positional embedding's grid resized bilinearly to ``visual_grid(...)`` with the class token kept.
    ModifiedResNet: the last stage's stride set to 1 and the attention-pool positional embedding
    resized to the ``H/16 × W/16`` feature map (``stride`` must be None).
    """
    visual = model.visual
    h, w = int(input_size[0]), int(input_size[1])
    if hasattr(visual, "conv1") and hasattr(visual, "class_embedding"):
        patch = visual.conv1.kernel_size[0]
        stride = int(stride or patch)
        if not 1 <= stride <= patch:
            raise ValueError(f"ViT patch stride must be in [1, {patch}], got {stride}")
        if h < patch or w < patch:
            raise ValueError(f"input size {input_size} is smaller than the {patch}px patch")
        pos = visual.positional_embedding.data
        old = round((pos.shape[0] - 1) ** 0.5)
        if old * old + 1 != pos.shape[0]:
            # Already adapted: recover the grid from the recorded size.
            old_hw = tuple(getattr(visual, "grid_hw"))
        else:
            old_hw = (old, old)
        new_hw = visual_grid((h, w), patch, stride)
        visual.positional_embedding = nn.Parameter(_resize_pos(pos, old_hw, new_hw), requires_grad=False)
        visual.conv1.stride = (stride, stride)
        visual.grid_hw = new_hw
        visual.input_resolution = (h, w)
        return model
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        if stride is not None:
            raise ValueError("overlapping-patch stride applies to ViT backbones only; got stride for a ResNet CLIP")
        if h % 16 or w % 16:
            raise ValueError(f"ResNet CLIP input size must be divisible by 16, got {input_size}")
        block = visual.layer4[0]
        block.avgpool = nn.Identity()
        block.stride = 1
        if block.downsample is not None and isinstance(block.downsample[0], nn.AvgPool2d):
            block.downsample[0] = nn.Identity()
        pos = visual.attnpool.positional_embedding.data
        old = round((pos.shape[0] - 1) ** 0.5)
        old_hw = tuple(getattr(visual, "grid_hw", (old, old)))
        new_hw = (h // 16, w // 16)
        visual.attnpool.positional_embedding = nn.Parameter(_resize_pos(pos, old_hw, new_hw), requires_grad=False)
        visual.grid_hw = new_hw
        visual.input_resolution = (h, w)
        return model
    raise ValueError(f"unsupported CLIP visual encoder {type(visual).__name__}")


def freeze(model: nn.Module) -> nn.Module:
    """Turn off gradients for every parameter and put the model in eval mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_clip(
    name_or_path: str | os.PathLike,
    *,
    input_size: tuple[int, int] = (256, 128),
    stride: int | None = None,
    download_root: str | None = None,
    frozen: bool = True,
    allow_download: bool = True,
) -> tuple[nn.Module, ClipInfo]:
    """Load CLIP on the CPU in fp32 through ``clip.load(name_or_path, jit=False)`` and adapt it.

    ``name_or_path`` is read by :func:`resolve_clip_source` (a model name such as ``ViT-B/16`` or a
    checkpoint path). A name's weights come from ``download_root`` (default ``~/.cache/clip``);
    when they are not there openai-clip downloads them, unless ``allow_download=False``.
    Returns ``(model, info)``; all parameters frozen unless ``frozen=False``.
    """
    clip = import_clip()
    name = resolve_clip_source(name_or_path)
    model, source = _clip_load(clip, name, download_root, allow_download)
    model = model.float()
    arch = "vit" if hasattr(model.visual, "class_embedding") else "resnet"
    patch = model.visual.conv1.kernel_size[0] if arch == "vit" else None
    adapt_visual(model, input_size, stride)
    if frozen:
        freeze(model)
    info = ClipInfo(
        name=name if name in clip.available_models() else Path(name).name,
        source=str(source),
        sha256=file_sha256(source),
        arch=arch,
        input_size=(int(input_size[0]), int(input_size[1])),
        stride=(int(stride) if stride else patch) if arch == "vit" else None,
        patch_size=patch,
        embed_dim=int(model.text_projection.shape[1]),
        vision_width=int(model.visual.conv1.out_channels if arch == "vit" else model.visual.attnpool.c_proj.in_features),
        text_width=int(model.ln_final.weight.shape[0]),
        context_length=int(model.positional_embedding.shape[0]),
        vocab_size=int(model.token_embedding.weight.shape[0]),
        param_count=int(sum(p.numel() for p in model.parameters())),
    )
    return model, info


# ---------------------------------------------------------------------------------------------
# Saving a CLIP in OpenAI's format


class _ClipForward(nn.Module):
    """Wraps CLIP so that tracing records every sub-module under OpenAI's key names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self._model = [model]  # not a sub-module: keeps the state-dict keys flat

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._model[0](image, text)


def save_clip_archive(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` as a TorchScript archive whose ``state_dict()`` has OpenAI's keys (atomic)."""
    import io

    clip = import_clip()
    model = model.float().eval()
    res = model.visual.input_resolution
    image = torch.zeros(1, 3, res, res)
    text = clip.tokenize(["a photo of a person."])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_ClipForward(model), (image, text), check_trace=False)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(traced, buf)
    return atomic_write_bytes(path, buf.getvalue())
