"""What the pair datasets share: items owned by volumes, and pairs drawn from ``(seed, epoch, index)``.

A subclass reads its volumes, calls :meth:`PairDataset._own` with the number of items each volume
owns, and implements :meth:`PairDataset._draw`. The randomness of an item comes only from its own
generator, seeded by ``(seed, epoch, index)``: a DataLoader worker or a DDP rank that draws item
``index`` draws the same pair as the main process would, whatever else it has drawn before.

The epoch lives in shared memory, so that :meth:`PairDataset.set_epoch` in the main process also
reaches DataLoader workers that outlive an epoch (``persistent_workers=True``): a worker holds its
own copy of the dataset, made when it started, and a plain attribute set later would never reach it.
"""

from __future__ import annotations

import bisect
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ._checks import check_int, check_transform


class PairDataset(Dataset):
    """Base of the pair datasets (not used on its own).

    Args:
        seed: base seed of the pair sampling (an int >= 0).
        transform: a callable applied to each item dict, or None.
    """

    def __init__(self, seed: int, transform: Optional[Callable[[Dict], Dict]]) -> None:
        self.seed = check_int(seed, "seed", 0)
        self.transform = check_transform(transform)
        # One int64 in shared memory: forked workers map the same page; spawned workers receive it
        # through torch's multiprocessing pickler, which passes the shared memory, not a copy.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._ends = [0]

    def _own(self, counts: Sequence[int]) -> None:
        """Volume ``v`` owns ``counts[v]`` consecutive indices."""
        self._ends = np.cumsum(counts).tolist()  # volume v owns indices [ends[v-1], ends[v])

    def _draw(self, volume: int, rng: np.random.Generator) -> Dict:
        """The item: a pair drawn from volume ``volume`` with ``rng`` only."""
        raise NotImplementedError

    @property
    def epoch(self) -> int:
        """The epoch whose pairs the items are (0 until :meth:`set_epoch` is called)."""
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Draw new pairs: the pairs of an epoch depend on ``(seed, epoch, index)`` only.

        Call it before iterating the DataLoader of that epoch; it reaches the DataLoader's worker
        processes too, persistent ones included, with ``fork`` and ``spawn`` alike.

        Raises:
            TypeError: ``epoch`` is not an int.
            ValueError: ``epoch`` < 0.
        """
        self._epoch.fill_(check_int(epoch, "epoch", 0))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> Dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} pairs")
        index = int(index) % len(self)
        volume = bisect.bisect_right(self._ends, index)
        item = self._draw(volume, np.random.default_rng((self.seed, self.epoch, index)))
        return self.transform(item) if self.transform is not None else item
