"""Training device and precision, resolved without Dagster.

``"auto"`` picks CUDA when it is available, else the CPU. Precision ``"auto"`` trains as CLIP-ReID does:
fp16 autocast with a grad scaler on a GPU, plain fp32 on the CPU; ``"bf16"`` is an explicit option
(no scaler). Test features are extracted in fp32 whatever the training precision (CLIP-ReID's
``do_inference`` runs without autocast): :meth:`DeviceSpec.for_inference`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import torch

__all__ = ["DeviceSpec", "resolve_device"]

_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceSpec:
    """A resolved device plus the autocast dtype to use on it (``None`` = fp32)."""

    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A grad scaler, enabled only for fp16 (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype is torch.float16)

    def for_inference(self, precision: str = "fp32") -> "DeviceSpec":
        """The same device with the precision used for test features (fp32 by default, as CLIP-ReID)."""
        if precision == "train":
            return self
        return resolve_device(str(self.device), precision)

    def describe(self) -> str:
        if self.is_cuda:
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return f"{torch.cuda.get_device_name(idx)} ({self.device}, {self.precision})"
        return f"cpu ({torch.get_num_threads()} threads, {self.precision})"


def resolve_device(device: str = "auto", precision: str = "auto") -> DeviceSpec:
    """Turn config strings into a :class:`DeviceSpec`, with clear errors for impossible requests."""
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"device {device!r} is not a valid torch device (use 'auto', 'cpu', 'cuda', 'cuda:0')") from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ValueError(f"precision {precision!r} needs a GPU; the CPU trains in fp32")
        return DeviceSpec(dev, None)
    if precision == "auto":
        return DeviceSpec(dev, torch.float16)  # the paper's mixed precision (with a grad scaler)
    return DeviceSpec(dev, {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision])
