"""Both training stages and feature extraction under ``torch.distributed`` (no Dagster here).

:func:`init_distributed` reads the environment ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), pins the process to ``cuda:LOCAL_RANK`` when it
trains on GPUs (NCCL) or stays on the CPU (gloo), and returns a :class:`Parallel`: what the stages,
the shared loop (:class:`~reid_pipeline.training.loop.RankHooks`) and the extraction need.

What makes W ranks train exactly like one process with the same *global* batch:

* **The same batches.** Every rank draws the single-process batch sequence from the same seeded
  generators (stage 1's permutation, the P×K sampler, the augmentation parameters) and keeps its
  contiguous slice of each global batch (:meth:`Parallel.bounds`). The generators therefore stay
  identical on every rank, and a checkpoint written by rank 0 resumes at any world size.
* **The same loss.** Per-sample means (ID, image-to-text) are computed on the local slice; the mean
  of W equal-size local means is the global mean, and DDP averages gradients over ranks. Terms that
  couple the whole batch — stage 1's SupCon (every image against every prompt of the batch), the
  batch-hard triplet loss, BatchNorm statistics — see the global batch through
  :meth:`Parallel.gather`, a differentiable all-gather whose backward sums the gradient over ranks
  (every rank's loss depends on every row). A term computed identically on all W ranks thus gets
  W× its gradient on each, which the 1/W of the gradient average cancels: the update is the
  single-process update, up to float summation order.
* **The same statistics.** With ``sync_bn`` the BNNecks (and a ResNet backbone's BatchNorms)
  normalise with global-batch statistics: ``torch.nn.SyncBatchNorm`` on CUDA (NCCL), and on the
  CPU, where PyTorch's SyncBatchNorm refuses to run, :class:`GatheredBatchNorm` (the same maths over
  the gathered rows). Without it each rank normalises its own slice — the fast-reid #54 trap.

Stage 2's trainable model is wrapped in ``DistributedDataParallel``. Stage 1 trains one tensor
(the prompt context), so its gradient is averaged with one ``all_reduce`` — what DDP would do with
a single bucket — which also stays exact for the epoch's last, unevenly split batch.

Only rank 0 writes checkpoints, logs and artefacts (``Parallel.is_main``; the loop's hooks).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from reid_pipeline.training.loop import RankHooks

__all__ = [
    "DistributedConfig",
    "DistributedError",
    "Parallel",
    "GatheredBatchNorm",
    "init_distributed",
    "torchrun_env_present",
    "shard_augment_params",
    "shutdown",
]


class DistributedError(RuntimeError):
    """A distributed set-up that cannot work (batch not divisible, backend unavailable, …)."""


class DistributedConfig(BaseModel):
    """How a stage runs under ``torch.distributed``.

    ``per_rank_batch``: the batch each rank processes; the stage's own batch setting is the
    *global* batch (stage 1 ``batch_size``, stage 2 ``ids_per_batch × instances_per_id``), and
    ``per_rank_batch × world_size`` must equal it (``None``: global / world size, which must divide).
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    sync_bn: bool = Field(False, description="BatchNorm statistics over the global batch (BNNecks, ResNet BNs)")
    per_rank_batch: int | None = Field(None, ge=1)
    timeout_s: float = Field(1800.0, gt=0, description="collective timeout (a dead rank fails the others after this)")


def torchrun_env_present() -> bool:
    """Whether this process was started by ``torchrun`` (or anything setting its variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


class _GatherRows(torch.autograd.Function):
    """All-gather rows (uneven sizes padded); backward: all-reduce SUM, keep the local rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...], rank: int, group) -> torch.Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(local, sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        lo = sum(ctx.sizes[: ctx.rank])
        return grad[lo : lo + ctx.sizes[ctx.rank]], None, None, None


def _all_gather_rows(local: torch.Tensor, sizes: tuple[int, ...], group) -> torch.Tensor:
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@dataclass
class Parallel:
    """This process's place in the job, and the few collectives the stages use."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    config: DistributedConfig = field(default_factory=DistributedConfig)
    group: object | None = None  #: a second group for gathers/statistics (DDP keeps the default one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ the loop's hooks

    def hooks(self) -> RankHooks:
        """Rank 0 decides to stop (its ``on_epoch_end``) and every rank follows; a barrier at the end."""
        def agree_stop(stop: bool) -> bool:
            flag = torch.tensor([1.0 if stop else 0.0], device=self._comm_device)
            dist.broadcast(flag, src=0, group=self.group)
            return bool(flag.item() > 0)

        return RankHooks(is_main=self.is_main, agree_stop=agree_stop, barrier=self.barrier)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ sharding

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice ``[lo, hi)`` of ``n`` items (the first ``n % W`` ranks get one more)."""
        return self.bounds_of(self.rank, n)

    def bounds_of(self, rank: int, n: int) -> tuple[int, int]:
        base, extra = divmod(int(n), self.world_size)
        lo = rank * base + min(rank, extra)
        return lo, lo + base + (1 if rank < extra else 0)

    def sizes(self, n: int) -> tuple[int, ...]:
        base, extra = divmod(int(n), self.world_size)
        return tuple(base + (1 if r < extra else 0) for r in range(self.world_size))

    def check_batch(self, global_batch: int, what: str) -> int:
        """The per-rank batch for ``global_batch``; raises when the two settings disagree."""
        per_rank = self.config.per_rank_batch
        if per_rank is None:
            if global_batch % self.world_size:
                raise DistributedError(
                    f"{what}: the global batch {global_batch} does not split over {self.world_size} ranks; "
                    f"choose a global batch divisible by {self.world_size} or set per_rank_batch"
                )
            return global_batch // self.world_size
        if per_rank * self.world_size != global_batch:
            raise DistributedError(
                f"{what}: per_rank_batch {per_rank} × world size {self.world_size} = {per_rank * self.world_size}, "
                f"but the global batch is {global_batch}; make them agree (the global batch fixes the trajectory)"
            )
        return per_rank

    # ------------------------------------------------------------------ collectives

    def gather(self, local: torch.Tensor, total: int | None = None) -> torch.Tensor:
        """The global batch's rows from every rank's slice, in rank order; differentiable.

        ``total``: the global row count when slices are uneven (:meth:`bounds` of ``total``);
        ``None`` means every rank holds ``local.shape[0]`` rows.
        """
        sizes = self.sizes(total) if total is not None else (int(local.shape[0]),) * self.world_size
        if sizes[self.rank] != local.shape[0]:
            raise DistributedError(f"rank {self.rank} holds {local.shape[0]} rows, expected {sizes[self.rank]}")
        if local.requires_grad and torch.is_grad_enabled():
            return _GatherRows.apply(local, sizes, self.rank, self.group)
        return _all_gather_rows(local, sizes, self.group)

    def gather_rows(self, local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Rows of known per-rank ``sizes`` (no gradient); the feature width may be unknown on an empty rank."""
        width = torch.tensor([local.shape[1] if local.dim() == 2 else 0], device=self._comm_device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX, group=self.group)
        if local.numel() == 0:
            local = torch.zeros(0, int(width.item()))
        return _all_gather_rows(local.to(self._comm_device), sizes, self.group).cpu()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a small tensor (equal-size local means → the global mean)."""
        out = values.detach().to(self._comm_device, torch.float64).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return (out / self.world_size).to(values.device)

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Average ``.grad`` over ranks (a rank whose slice was empty contributes zeros)."""
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world_size)

    # ------------------------------------------------------------------ models

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` (moved to this rank's device) with synchronised BatchNorm when configured, in DDP."""
        if self.config.sync_bn:
            if self.device.type == "cuda":
                converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                converted = GatheredBatchNorm.convert(model, self)
            if converted is not model:
                raise DistributedError("the model itself is a BatchNorm layer; wrap a model that contains one")
        model.to(self.device)
        ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class GatheredBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics come from the global batch, on any backend.

    The rows of every rank are gathered (:meth:`Parallel.gather`), normalised together exactly as
    one process would (running statistics updated from the global batch), and this rank keeps its
    rows; the gradient flows back to every rank through the gather. Same parameters and buffers as
    ``BatchNorm1d/2d`` (checkpoints do not change). In eval mode it is plain BatchNorm.
    """

    def __init__(self, num_features: int, parallel: Parallel, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self._parallel = parallel

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        par = self._parallel
        if not self.training or par.world_size == 1:
            return super().forward(input)
        full = par.gather(input)
        lo = par.rank * input.shape[0]
        return super().forward(full)[lo : lo + input.shape[0]]

    @classmethod
    def convert(cls, module: nn.Module, parallel: Parallel) -> nn.Module:
        """Replace every BatchNorm in ``module`` (in place for children; the same tensors are kept)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, parallel, module.eps, module.momentum, module.affine, module.track_running_stats)
            if module.affine:
                out.weight, out.bias = module.weight, module.bias
            if module.track_running_stats:
                out.running_mean, out.running_var = module.running_mean, module.running_var
                out.num_batches_tracked = module.num_batches_tracked
            out.train(module.training)
            return out
        for name, child in list(module.named_children()):
            new = cls.convert(child, parallel)
            if new is not child:
                module.add_module(name, new)
        return module


def shard_augment_params(params, lo: int, hi: int, channels: int = 3):
    """This rank's slice of a global batch's augmentation parameters. The erase noise stays aligned:
    the slice draws the whole batch's noise (CPU ``randn`` values depend on the draw's length) and
    keeps the values its rows consume."""
    from reid_pipeline.data.transforms import AugmentParams

    box = params.box
    per_row = box[:, 2] * box[:, 3] * params.erase.long() * int(channels)
    return AugmentParams(flip=params.flip[lo:hi], top=params.top[lo:hi], left=params.left[lo:hi],
                         erase=params.erase[lo:hi], box=box[lo:hi], noise_seed=params.noise_seed,
                         noise_offset=int(per_row[:lo].sum()), noise_total=int(per_row.sum()))


def init_distributed(config: DistributedConfig | None = None, device: str = "auto") -> Parallel:
    """Join the job ``torchrun`` started (its environment variables), pinned to this rank's device.

    ``device``: ``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else the CPU), ``cpu`` or
    ``cuda``. The backend is NCCL on GPUs and gloo on the CPU unless ``config.backend`` says otherwise.
    """
    config = config or DistributedConfig()
    if not torchrun_env_present():
        raise DistributedError("not started by torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT must be set")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} requested but CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} visible GPUs "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower nproc_per_node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise DistributedError("backend 'nccl' needs GPUs; use 'gloo' (or 'auto') on the CPU")
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config.timeout_s), **kwargs)
    group = dist.new_group(backend=backend)
    return Parallel(rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend,
                    config=config, group=group)


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()
