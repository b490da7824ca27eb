"""Tensors on disk: safetensors plus a JSON sidecar, written atomically.

Nothing here pickles: weights go to ``.safetensors``, everything else (shapes, label→pid maps,
versions, optimiser hyper-parameters, RNG states) to a JSON file beside it. Every write goes to a
temporary file in the destination folder and is moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint and never destroys the previous one.

This module does not import dagster: checkpoints are loadable from a notebook.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load_bytes
from safetensors.torch import save as st_save_bytes

__all__ = [
    "CheckpointError",
    "StorageFullError",
    "free_bytes",
    "check_free_space",
    "no_space_error",
    "create_temp_file",
    "remove_quietly",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "sidecar_path",
    "save_tensors",
    "load_tensors",
    "file_sha256",
    "tensors_fingerprint",
    "save_training_state",
    "load_training_state",
]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match what the caller expects."""


class StorageFullError(OSError):
    """The file system holding ``filename`` has no room (``ENOSPC``/``EDQUOT``) for a write.

    A subclass of :class:`OSError` with that ``errno``; its message names the path, the bytes
    needed (when known) and the bytes free.
    """


_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: Below this size a write does not look at the free space first (a statvfs per small file).
_CHECK_SPACE_FROM = 1 << 20


def _existing_folder(path: Path) -> Path:
    folder = path
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder if folder.is_dir() else folder.parent


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on the file system of ``path`` (or of its nearest
    existing parent); ``None`` when the file system does not say (``statvfs`` reports no blocks)."""
    try:
        st = os.statvfs(_existing_folder(Path(path)))
    except OSError:
        return None
    if st.f_blocks == 0:
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def no_space_error(path: str | os.PathLike, needed: int | None = None,
                   code: int = errno.ENOSPC, what: str = "writing") -> StorageFullError:
    """A :class:`StorageFullError` for ``path`` saying how much was needed and how much is free."""
    free = free_bytes(path)
    parts = []
    if needed is not None:
        parts.append(f"needs {_fmt_bytes(int(needed))}")
    if free is not None:
        parts.append(f"{_fmt_bytes(free)} free")
    detail = f" ({', '.join(parts)})" if parts else ""
    return StorageFullError(code, f"{path}: no space left on the device while {what}{detail}; free some space or "
                            "point the storage at a larger volume", os.fspath(path))


def check_free_space(path: str | os.PathLike, needed: int, what: str = "writing") -> None:
    """Raise :class:`StorageFullError` naming ``path`` when fewer than ``needed`` bytes are free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise no_space_error(path, needed, what=what)


def remove_quietly(path: str | os.PathLike) -> None:
    """Delete ``path`` if it exists; errors are ignored (used on failure paths)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def create_temp_file(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, Path]:
    """Create a hidden, empty temporary file beside ``path``; return ``(fd, temp path)``.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file gets ``0666`` minus the umask, so what
    is moved into place from it follows the umask like any other file.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno in _NO_SPACE_ERRNOS:
                raise no_space_error(path, code=exc.errno, what="creating a temporary file") from exc
            raise
    raise FileExistsError(f"{path}: could not create a unique temporary file beside it")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file follows the umask. On any failure the temporary file is removed and ``path`` is left
    as it was; a full disk raises :class:`StorageFullError` naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _NO_SPACE_ERRNOS:
            raise no_space_error(path.parent, code=exc.errno, what="creating the folder") from exc
        raise
    if len(data) >= _CHECK_SPACE_FROM:
        check_free_space(path, len(data))
    fd, tmp = create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        if exc.errno in _NO_SPACE_ERRNOS:
            raise no_space_error(path, len(data), code=exc.errno) from exc
        raise
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: JSON file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def sidecar_path(path: str | os.PathLike) -> Path:
    """``foo.safetensors`` → ``foo.json``."""
    return Path(path).with_suffix(".json")


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> Path:
    """Save ``tensors`` to ``path`` (safetensors) and ``meta`` to its JSON sidecar, atomically.

    The sidecar also records each tensor's shape and dtype, so a reader can check a file without
    loading it. The tensors file is written first and the sidecar last: a sidecar that exists
    always describes a complete tensors file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: expected a file name ending in .safetensors")
    clean = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"save_tensors({path}): value for {name!r} is {type(t).__name__}, expected a tensor")
        clean[name] = t.detach().to("cpu").contiguous()
    atomic_write_bytes(path, st_save_bytes(clean))
    sidecar = dict(meta or {})
    sidecar["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in clean.items()}
    write_json(sidecar_path(path), sidecar)
    return path


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load what :func:`save_tensors` wrote: ``(tensors, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    meta = read_json(sidecar_path(path)) if sidecar_path(path).is_file() else {}
    try:
        tensors = st_load_bytes(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    expected = meta.get("tensors")
    if expected:
        for name, info in expected.items():
            if name not in tensors:
                raise CheckpointError(f"{path}: sidecar lists tensor {name!r} that the file does not hold")
            if list(tensors[name].shape) != list(info["shape"]):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(tensors[name].shape)}, sidecar says {info['shape']}"
                )
    return {k: v.to(device) for k, v in tensors.items()}, meta


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of ``tensors`` (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d tensors too
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Training state (for resuming): model tensors + optimiser state + RNG states, no pickle.


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt_state["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_training_state(
    path: str | os.PathLike,
    *,
    model_tensors: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    epoch: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save everything needed to resume a loop bit-identically after ``epoch`` epochs.

    ``model_tensors`` are stored under ``model.<name>``; the optimiser's per-parameter tensors under
    ``optim.<idx>.<key>``; torch's global CPU RNG and every named ``torch.Generator`` under
    ``rng.<name>``; Python's and numpy's global RNG states and ``extra`` in the JSON sidecar.
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model_tensors.items()}
    meta: dict[str, Any] = {"epoch": int(epoch), "extra": dict(extra or {})}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    tensors["rng.torch"] = torch.get_rng_state()
    for name, gen in (generators or {}).items():
        tensors[f"rng.{name}"] = gen.get_state()
    py_state = random.getstate()
    meta["python_rng"] = [py_state[0], list(py_state[1]), py_state[2]]
    np_state = np.random.get_state()
    meta["numpy_rng"] = [np_state[0], np_state[1].tolist(), *np_state[2:]]
    return save_tensors(path, tensors, meta)


def load_training_state(
    path: str | os.PathLike,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_global_rng: bool = True,
) -> tuple[dict[str, torch.Tensor], int, dict]:
    """Inverse of :func:`save_training_state`: returns ``(model_tensors, epoch, extra)``.

    Restores the optimiser state and generator states in place when given.
    """
    tensors, meta = load_tensors(path)
    if "epoch" not in meta:
        raise CheckpointError(f"{path}: not a training-state checkpoint (its sidecar has no 'epoch')")
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{path}: holds no optimiser state")
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    for name, gen in (generators or {}).items():
        key = f"rng.{name}"
        if key not in tensors:
            raise CheckpointError(f"{path}: holds no state for generator {name!r}")
        gen.set_state(tensors[key])
    if restore_global_rng:
        torch.set_rng_state(tensors["rng.torch"])
        v, state, gauss = meta["python_rng"]
        random.setstate((v, tuple(state), gauss))
        n = meta["numpy_rng"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    return model, int(meta["epoch"]), meta.get("extra", {})
