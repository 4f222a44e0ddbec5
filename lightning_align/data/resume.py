"""Training order that survives a checkpoint: a seeded permutation per epoch, and on resume the epoch continues
after the batches already trained on, so a resumed run sees what an uninterrupted one would have."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochPermutation(DistributedSampler):
    """A permutation of `range(n)` (without `shuffle`, `range(n)` itself) drawn from `seed` and the trainer's
    current epoch (read through `epoch`), so the order of any epoch can be drawn again after a restart; process
    `rank` of `world_size` takes every `world_size`-th index from its rank on (the permutation padded by its
    start to a multiple of `world_size`).

    One process with batch B and W processes with batch B / W thus train on the same examples at every step.
    Being a `DistributedSampler`, Lightning uses it as it is instead of putting its own in its place.
    """

    def __init__(
        self, n: int, seed: int, epoch: Callable[[], int], rank: int = 0, world_size: int = 1, shuffle: bool = True
    ):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_samples = math.ceil(n / world_size)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        pass  # the epoch is read from the trainer, which also knows it after a resume

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch())
        order = torch.randperm(self.n, generator=generator).tolist() if self.shuffle else list(range(self.n))
        order += order[: self.num_samples * self.world_size - self.n]
        return iter(order[self.rank :: self.world_size])


class ResumableLoader(DataLoader):
    """A DataLoader that skips `skip()` batches at the start of an iteration: the batches of the current epoch
    trained on before the checkpoint a run resumes from (the data module remembers them in its checkpoint state).

    Its own seeded generator keeps iterator creation from drawing on the global RNG, which a resumed run would
    draw from at another moment than an uninterrupted one.
    """

    def __init__(self, *args, skip: Callable[[], int] | None = None, **kwargs):
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
        super().__init__(*args, **kwargs)
        self.skip = skip

    # Lightning warns that a loader without these cannot resume mid-epoch; this one does, through the data
    # module's own checkpoint state, so there is nothing for Lightning to keep here.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        iterator = super().__iter__()
        for _ in range(self.skip() if self.skip is not None else 0):
            next(iterator, None)  # collated and dropped: cheap next to a training step
        return iterator
