"""A sharded sampler and a DataLoader that resume exactly in the middle of an epoch.

Why not Lightning's DistributedSampler injection: it cannot resume mid-epoch, so a job requeued
at step N would replay (or skip) batches. Here the order of an epoch is a pure function of
``(seed, epoch)``, each rank takes a disjoint equal-size slice of it, and the loader counts the
batches it has *delivered* (after any worker prefetch), which is what goes into the checkpoint.

How Lightning 2.6 drives this (``loops/fit_loop.py``): ``FitLoop.on_save_checkpoint`` stores
``[loader.state_dict()]`` for every train loader that has ``state_dict``/``load_state_dict``
(``utilities/combined_loader.py``), and on resume ``setup_data`` calls ``load_state_dict`` before
it creates the iterator. It also calls ``sampler.set_epoch(epoch)`` at the start of every epoch,
possibly after ``iter()``; the loader therefore builds its worker iterator lazily, on the first
``next()``, so a ``set_epoch`` that arrives in between is honoured.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler


def dist_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): the given values, else torch.distributed's when initialised, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return (dist.get_rank() if rank is None else rank), (dist.get_world_size() if world_size is None else world_size)
    return (rank or 0), (world_size or 1)


class ShardedSampler(DistributedSampler):
    """Indices ``0..dataset_len-1``, shuffled per epoch (or in order), sharded by rank.

    Every rank gets ``dataset_len // world_size`` indices (the remainder, fewer than
    ``world_size`` samples, is dropped), so shards are disjoint and equally long and no rank
    waits for another. With ``shuffle`` the epoch's order is a permutation seeded by
    ``(seed, epoch)`` only; rank ``r`` takes every ``world_size``-th index starting at ``r``.

    It subclasses DistributedSampler only so that Lightning (even with the default
    ``use_distributed_sampler=True``) sees it is already sharded and never wraps it; the parent's
    ``__init__`` is skipped because it fixes rank and world size at construction time.

    Args:
        dataset_len: number of samples in the dataset.
        shuffle: permute per epoch (train) or keep the dataset order (evaluation).
        seed: seed of the permutation.
        rank, world_size: an explicit shard (tests); ``None`` reads torch.distributed when iterating.

    State: ``epoch`` and ``start`` (how many of this rank's indices of the current epoch were
    already delivered); :class:`ResumableDataLoader` keeps them up to date.
    """

    def __init__(self, dataset_len: int, *, shuffle: bool, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        Sampler.__init__(self)
        self.dataset_len = int(dataset_len)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = True
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self.start = 0

    @property
    def rank(self) -> int:  # type: ignore[override]
        return dist_rank_world(self._rank, self._world)[0]

    @property
    def num_replicas(self) -> int:  # type: ignore[override]
        return dist_rank_world(self._rank, self._world)[1]

    @property
    def num_samples(self) -> int:  # type: ignore[override]
        """Indices per rank in a full epoch."""
        return self.dataset_len // self.num_replicas

    @property
    def total_size(self) -> int:  # type: ignore[override]
        return self.num_samples * self.num_replicas

    def shard(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in delivery order."""
        rank, world = dist_rank_world(self._rank, self._world)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of size {world}")
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        return order[: self.dataset_len // world * world][rank::world]

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; a new epoch starts from its first index."""
        if epoch != self.epoch:
            self.epoch, self.start = int(epoch), 0

    def __iter__(self) -> Iterator[int]:
        # materialised now: later updates of `start` by the loader must not shift this pass
        return iter(self.shard(self.epoch)[self.start:].tolist())

    def __len__(self) -> int:
        """Indices per rank in a full epoch (Lightning sizes the epoch with it, also on resume)."""
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ShardedSampler` whose position survives a checkpoint.

    ``state_dict()`` is ``{epoch, start, ...}`` where ``start`` counts samples already delivered to
    the training loop on this rank; ``load_state_dict`` restores it and the next ``iter()``
    continues from there. On the last batch of an epoch the state moves to the next epoch, so a
    checkpoint taken at an epoch boundary resumes with the next epoch's first batch.

    If Lightning swaps the sampler (``overfit_batches`` installs a SequentialSampler), the loader
    behaves like a plain DataLoader.
    """

    def __iter__(self) -> Iterator[Any]:
        if not isinstance(self.sampler, ShardedSampler):
            return super().__iter__()
        return self._tracked_iter()

    def _tracked_iter(self) -> Iterator[Any]:
        # a generator: nothing below runs until the first next(), after Lightning's set_epoch
        sampler = self.sampler
        assert isinstance(sampler, ShardedSampler) and self.batch_size is not None
        per_epoch = len(self)
        if sampler.start >= per_epoch * self.batch_size:  # e.g. a resumed state past the end
            sampler.epoch, sampler.start = sampler.epoch + 1, 0
        delivered = sampler.start // self.batch_size
        for batch in super().__iter__():
            delivered += 1
            if delivered >= per_epoch:
                sampler.epoch, sampler.start = sampler.epoch + 1, 0
            else:
                sampler.start = delivered * self.batch_size
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from (saved by Lightning into the checkpoint's loop state)."""
        if not isinstance(self.sampler, ShardedSampler):
            return {}
        s = self.sampler
        return {"epoch": s.epoch, "start": s.start, "seed": s.seed, "dataset_len": s.dataset_len,
                "batch_size": self.batch_size, "world_size": s.num_replicas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position; a changed world or batch size keeps the global sample position
        (rounded down to a whole batch), with a warning since the order then differs."""
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ShardedSampler):
            return
        assert self.batch_size is not None
        world = sampler.num_replicas
        start = int(state_dict["start"])
        old_world, old_bs = int(state_dict.get("world_size", world)), int(state_dict.get("batch_size", self.batch_size))
        if (old_world, old_bs) != (world, self.batch_size):
            warnings.warn(f"resuming with world_size={world}, batch_size={self.batch_size} from a checkpoint made with "
                          f"{old_world}, {old_bs}: the sample position is kept but the batch order is not the original one", stacklevel=2)
            start = start * old_world // world // self.batch_size * self.batch_size
        if (state_dict.get("seed"), state_dict.get("dataset_len")) != (sampler.seed, sampler.dataset_len):
            warnings.warn(f"resuming a data loader whose seed/dataset size changed ({state_dict.get('seed')}, "
                          f"{state_dict.get('dataset_len')}) -> ({sampler.seed}, {sampler.dataset_len}): the batch order differs", stacklevel=2)
        sampler.epoch, sampler.start = int(state_dict["epoch"]), start


def batches_per_epoch(dataset_len: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Batches each rank sees per epoch with :class:`ShardedSampler` (used for early checks)."""
    per_rank = dataset_len // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)

