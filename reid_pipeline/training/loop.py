"""The one training loop both CLIP-ReID stages run in.

A stage (:class:`Stage`) knows how to train one epoch and what its state is; :func:`run_training`
does everything around it, the same way for stage 1 and stage 2:

* resume from a training-state checkpoint (model tensors, optimiser, grad scaler, RNG generators,
  history), refusing one written for another config or data, and detecting a *torn* checkpoint
  (tensors from one save, sidecar from another: each save writes a fresh token into both files);
* epochs ``start+1 .. epochs``, one ``stage.run_epoch(epoch)`` each, which returns that epoch's
  statistics and raises :class:`NonFiniteLossError` when a loss is NaN/inf (nothing is saved then:
  the last good checkpoint stays as it was);
* one history row per epoch with the same field names in both stages (:data:`COMMON_FIELDS` plus
  the stage's own terms), a checkpoint every ``checkpoint_every`` epochs and after the last;
* one callback, ``on_epoch_end(stats)``, called after the epoch's checkpoint; returning ``True``
  stops the run there (the one way to stop early — a planned interruption, or a user's budget);
* the same :class:`LoopResult` for both stages.

Distributed training wraps this loop rather than copying it: :class:`RankHooks` says whether this
process is the main one (only it writes checkpoints, logs and calls ``on_epoch_end``), how ranks
agree on stopping, and how they wait for each other; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from reid_pipeline.storage import CheckpointError, load_training_state, save_training_state, sidecar_path

__all__ = [
    "COMMON_FIELDS",
    "NonFiniteLossError",
    "Stage",
    "RankHooks",
    "LoopResult",
    "run_training",
    "remove_training_state",
    "format_eta",
]

STATE_FORMAT = "reid_pipeline.training.v2"
#: Fields every history row has, in both stages.
COMMON_FIELDS = ("epoch", "epochs", "loss", "lr", "samples", "steps", "seconds", "samples_per_s", "eta_s")


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; names the epoch, the step (1-based) and the last good checkpoint."""

    def __init__(self, message: str, *, epoch: int, step: int, terms: Mapping[str, float] | None = None,
                 checkpoint: str | None = None):
        super().__init__(message)
        self.epoch, self.step, self.terms, self.checkpoint = epoch, step, dict(terms or {}), checkpoint


class Stage(Protocol):
    """What a training stage plugs into :func:`run_training`."""

    name: str  #: "stage 1" / "stage 2" — used in messages
    epochs: int
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generators: Mapping[str, torch.Generator]

    def identity(self) -> dict[str, Any]:
        """JSON-able config + data identity; a checkpoint with another identity is refused."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors to checkpoint (model, prompts, …)."""

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        """Restore what :meth:`state_tensors` returned."""

    def run_epoch(self, epoch: int, log: Callable[[str], None]) -> dict[str, float]:
        """Train one (1-based) epoch; return at least ``loss``, ``lr``, ``samples`` and ``steps``."""


@dataclass(frozen=True)
class RankHooks:
    """How the loop runs under ``torch.distributed``; the defaults are one process."""

    is_main: bool = True
    agree_stop: Callable[[bool], bool] = lambda stop: stop
    barrier: Callable[[], None] = lambda: None


@dataclass
class LoopResult:
    """What :func:`run_training` returns (the same for both stages)."""

    history: list[dict[str, float]]
    epochs: int
    epochs_completed: int
    completed: bool
    resumed_from_epoch: int
    wall_time_s: float
    samples_per_s: float
    iterations: int
    final_loss: float

    @property
    def loss_per_epoch(self) -> list[float]:
        return [float(row["loss"]) for row in self.history]


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds))) if math.isfinite(seconds) else 0
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _token_tensor(token: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(token), dtype=torch.uint8).clone()


def _save(path: Path, stage: Stage, epoch: int, history: list[dict[str, float]]) -> None:
    token = os.urandom(16)
    save_training_state(
        path,
        # The epoch and a fresh token go into the tensors file and into the sidecar: the two are
        # separate files, so a crash between their writes (or files copied from different saves)
        # is detected instead of being resumed from mismatched halves.
        model_tensors={**stage.state_tensors(), "loop.epoch": torch.tensor(epoch, dtype=torch.int64),
                       "loop.token": _token_tensor(token)},
        optimizer=stage.optimizer,
        generators=stage.generators,
        epoch=epoch,
        extra={
            "format": STATE_FORMAT,
            "stage": stage.name,
            "token": token.hex(),
            "identity": stage.identity(),
            "history": history,
            "grad_scaler": stage.scaler.state_dict() if stage.scaler.is_enabled() else None,
        },
    )


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            out += _diff(saved.get(key), current.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == current else [f"{prefix.rstrip('.')}: saved {saved!r} vs now {current!r}"]


def _resume(path: Path, stage: Stage) -> tuple[int, list[dict[str, float]]]:
    tensors, epoch, extra = load_training_state(path)  # checks shapes against the sidecar
    if extra.get("format") != STATE_FORMAT or extra.get("stage") != stage.name:
        raise CheckpointError(
            f"{path}: not a {stage.name} training state (format {extra.get('format')!r}, stage {extra.get('stage')!r}; "
            f"expected {STATE_FORMAT!r}, {stage.name!r})"
        )
    saved_epoch = int(tensors.pop("loop.epoch", torch.tensor(-1)))
    token = bytes(tensors.pop("loop.token", torch.zeros(0, dtype=torch.uint8)).tolist()).hex()
    if saved_epoch != epoch or token != extra.get("token"):
        raise CheckpointError(
            f"{path}: torn checkpoint (tensors from epoch {saved_epoch}, sidecar {sidecar_path(path).name} from epoch "
            f"{epoch}, save tokens {'match' if token == extra.get('token') else 'differ'}) — delete both files to start "
            f"{stage.name} afresh"
        )
    problems = _diff(extra.get("identity"), stage.identity())
    if problems:
        raise CheckpointError(
            f"{path}: training state belongs to a different {stage.name} run ({'; '.join(problems[:6])}) — "
            "delete it to start afresh"
        )
    stage.load_state_tensors(tensors, source=str(path))
    load_training_state(path, optimizer=stage.optimizer, generators=stage.generators)
    if extra.get("grad_scaler") and stage.scaler.is_enabled():
        stage.scaler.load_state_dict(extra["grad_scaler"])
    return epoch, [dict(row) for row in extra.get("history", [])]


def remove_training_state(path: str | os.PathLike | None) -> None:
    """Delete a finished run's training state (tensors and sidecar) and its folder when empty."""
    if path is None:
        return
    path = Path(path)
    path.unlink(missing_ok=True)
    sidecar_path(path).unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # not empty (another file) or already gone


def _emit(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def _epoch_line(stage: Stage, row: Mapping[str, float], terms: tuple[str, ...]) -> str:
    parts = ", ".join(f"{k} {row[k]:.4f}" for k in terms if k in row)
    return (
        f"{stage.name} epoch {int(row['epoch'])}/{int(row['epochs'])}: loss {row['loss']:.4f}"
        + (f" ({parts})" if parts else "")
        + f", lr {row['lr']:.2e}, {row['samples_per_s']:.1f} samples/s, ETA {format_eta(row['eta_s'])}"
    )


def run_training(
    stage: Stage,
    *,
    state_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    on_epoch_end: Callable[[dict[str, float]], bool | None] | None = None,
    log: Callable[[str], None] | None = None,
    log_terms: tuple[str, ...] = (),
    hooks: RankHooks | None = None,
) -> LoopResult:
    """Run (or resume) ``stage`` to ``stage.epochs``; see the module docstring.

    Args:
        state_path: ``*.safetensors`` training-state file; written every ``checkpoint_every``
            epochs and after the last (main process only); resumed from when it exists.
        on_epoch_end: called with the epoch's history row after its checkpoint (main process
            only); ``True`` stops the run (``completed=False``).
        log: receives one line per epoch (and the stage's own progress lines).
        log_terms: the stage's loss terms/accuracies to show in the epoch line.

    Raises:
        CheckpointError: the state file is foreign, torn or written for another run.
        NonFiniteLossError: from the stage; nothing is saved for the failing epoch.
    """
    hooks = hooks or RankHooks()
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    state_file = Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.suffix != ".safetensors":
        raise ValueError(f"state_path {state_file}: expected a file name ending in .safetensors")
    start, history = 0, []
    if state_file is not None and state_file.is_file():
        start, history = _resume(state_file, stage)
        _emit(log if hooks.is_main else None, f"{stage.name}: resuming from {state_file} after epoch {start}/{stage.epochs}")

    t_call = time.perf_counter()
    seconds_here, samples_here, steps_here = 0.0, 0, 0
    last = start
    stopped = False
    for epoch in range(start + 1, stage.epochs + 1):
        t0 = time.perf_counter()
        stats = stage.run_epoch(epoch, log if hooks.is_main else (lambda _m: None))
        seconds = time.perf_counter() - t0
        seconds_here += seconds
        samples_here += int(stats["samples"])
        steps_here += int(stats["steps"])
        row = {k: float(v) for k, v in stats.items()}
        row.update(
            epoch=epoch, epochs=stage.epochs, seconds=seconds,
            samples_per_s=stats["samples"] / seconds if seconds > 0 else math.inf,
            eta_s=seconds_here / (epoch - start) * (stage.epochs - epoch),
        )
        history.append(row)
        last = epoch
        if hooks.is_main and state_file is not None and (epoch % checkpoint_every == 0 or epoch == stage.epochs):
            _save(state_file, stage, epoch, history)
        _emit(log if hooks.is_main else None, _epoch_line(stage, row, log_terms))
        stop = bool(on_epoch_end(dict(row))) if (hooks.is_main and on_epoch_end is not None) else False
        if hooks.agree_stop(stop) and epoch < stage.epochs:
            if hooks.is_main and state_file is not None and epoch % checkpoint_every != 0:
                _save(state_file, stage, epoch, history)  # a stop always leaves a resumable state
            stopped = True
            break
    hooks.barrier()
    return LoopResult(
        history=history,
        epochs=stage.epochs,
        epochs_completed=last,
        completed=last >= stage.epochs and not stopped,
        resumed_from_epoch=start,
        wall_time_s=time.perf_counter() - t_call,
        samples_per_s=samples_here / seconds_here if seconds_here > 0 else 0.0,
        iterations=steps_here,
        final_loss=float(history[-1]["loss"]) if history else math.nan,
    )
