"""P×K identity sampler with the semantics of CLIP-ReID's ``RandomIdentitySampler``.

Per epoch:

1. for every identity, its image indices are shuffled and cut into groups of K (a trailing group
   smaller than K is dropped); an identity with fewer than K images gets one group of K drawn
   *with replacement*;
2. while at least P identities still have groups left, P distinct identities are drawn uniformly
   from those, and each contributes its next group — one batch of P·K indices;
3. identities whose groups are used up leave the pool, so an epoch has about
   ``sum_i max(n_i, K) // K / P`` batches and every batch holds exactly P identities × K images.

Randomness comes only from the sampler's own ``torch.Generator`` (never Python's or numpy's
global RNG), so a sequence of epochs is a pure function of the seed and the generator state can be
checkpointed and restored.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["PKSampler"]


class PKSampler:
    """Yields batches (lists of dataset indices) of ``p`` identities × ``k`` images.

    ``pids``: identity label of every dataset item (any hashable ints). ``generator`` (CPU) or
    ``seed`` makes it deterministic; one pass of ``iter(sampler)`` is one epoch.
    """

    def __init__(
        self,
        pids: Sequence[int] | np.ndarray | torch.Tensor,
        p: int = 16,
        k: int = 4,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        if int(p) < 1 or int(k) < 1:
            raise ValueError(f"P and K must be >= 1, got P={p}, K={k}")
        labels = torch.as_tensor(np.asarray(pids)).reshape(-1).tolist()
        if not labels:
            raise ValueError("PKSampler needs at least one item")
        self.p, self.k = int(p), int(k)
        self.index_of: dict[int, list[int]] = {}
        for idx, pid in enumerate(labels):
            self.index_of.setdefault(int(pid), []).append(idx)
        self.pids = list(self.index_of)  # first-appearance order: deterministic
        if len(self.pids) < self.p:
            raise ValueError(
                f"P×K sampling needs at least P={self.p} identities, the data has {len(self.pids)}; "
                "lower ids_per_batch or add identities"
            )
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(0 if seed is None else int(seed))
        elif generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
        self.generator = generator

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @property
    def num_samples_estimate(self) -> int:
        """CLIP-ReID's ``len(sampler)``: Σ over identities of ``max(n, K)`` rounded down to K."""
        total = 0
        for idxs in self.index_of.values():
            n = max(len(idxs), self.k)
            total += n - n % self.k
        return total

    def __len__(self) -> int:
        """Estimated batches per epoch (an upper bound; the last identities may not fill a batch)."""
        return self.num_samples_estimate // self.batch_size

    def _groups(self) -> dict[int, list[list[int]]]:
        g, k = self.generator, self.k
        groups: dict[int, list[list[int]]] = {}
        for pid in self.pids:
            idxs = self.index_of[pid]
            if len(idxs) < k:
                picks = torch.randint(0, len(idxs), (k,), generator=g).tolist()
                chosen = [idxs[j] for j in picks]
            else:
                order = torch.randperm(len(idxs), generator=g).tolist()
                chosen = [idxs[j] for j in order]
            n_full = len(chosen) // k
            groups[pid] = [chosen[i * k : (i + 1) * k] for i in range(n_full)]
        return groups

    def __iter__(self) -> Iterator[list[int]]:
        groups = self._groups()
        available = [pid for pid in self.pids if groups[pid]]
        batches: list[list[int]] = []
        while len(available) >= self.p:
            pick = torch.randperm(len(available), generator=self.generator)[: self.p].tolist()
            selected = [available[j] for j in pick]
            batch: list[int] = []
            for pid in selected:
                batch.extend(groups[pid].pop(0))
            batches.append(batch)
            exhausted = {pid for pid in selected if not groups[pid]}
            if exhausted:
                available = [pid for pid in available if pid not in exhausted]
        # All draws happen before the first batch is yielded: the generator's state after
        # ``iter()`` no longer depends on how far a consumer iterates.
        return iter(batches)
