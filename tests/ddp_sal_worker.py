"""One process of the SALModel DDP test (tests/test_sal_model.py starts two).

    python tests/ddp_sal_worker.py RANK WORLD PORT OUT

Three modes, one after the other in one process group: ``model``,
``DistributedDataParallel(SALModel(encoder, criterion))``, the intended use; ``apart``, only the
encoder in DDP, the criterion called beside it; ``unregistered``, a DDP module whose forward calls a
criterion it does not hold as a submodule. Each rank trains three steps on its own random pairs (so
un-averaged gradients differ) and saves its head before and after, and the warnings it saw:
``OUT`` gets ``{mode: results}``.
"""

from __future__ import annotations

import datetime
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import salign_kernels as sk


class Unregistered(nn.Module):
    """Holds the encoder; reaches the criterion through a list, so DDP never sees its parameters."""

    def __init__(self, encoder, criterion):
        super().__init__()
        self.encoder, self.outside = encoder, [criterion]

    def forward(self, image_a, image_b, pos_a, pos_b):
        return self.outside[0](self.encoder(image_a), self.encoder(image_b), pos_a, pos_b)


def train(mode: str, rank: int) -> dict:
    torch.manual_seed(0)  # the same initial weights on every rank, as a training script seeds them
    encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 4, stride=4))
    criterion = sk.SALoss(8, window=3, hidden=16)
    if mode == "model":
        trained = DistributedDataParallel(sk.SALModel(encoder, criterion))
        step = lambda a, b, pa, pb, ma, mb: trained(a, b, pa, pb, ma, mb)
    elif mode == "apart":
        trained = DistributedDataParallel(encoder)
        # One DDP forward per step (both images at once): DDP expects one forward per backward.
        step = lambda a, b, pa, pb, ma, mb: criterion(*trained(torch.cat([a, b])).chunk(2), pa, pb,
                                                      sk.feature_mask(ma, (4, 4)),
                                                      sk.feature_mask(mb, (4, 4)))
    else:
        trained = DistributedDataParallel(Unregistered(encoder, criterion))
        step = lambda a, b, pa, pb, ma, mb: trained(a, b, pa, pb)
    optimizer = torch.optim.SGD([*encoder.parameters(), *criterion.parameters()], lr=0.5)
    before = {k: v.clone() for k, v in criterion.head.state_dict().items()}
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own pairs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            a, b = torch.rand(2, 2, 1, 16, 16, generator=generator)
            # Offsets near +0.7, beyond what the fresh head predicts: the L1 gradient of every sample
            # has the same sign, so the last bias moves (random offsets can cancel it to exactly 0).
            pos_a, pos_b = 0.1 * torch.rand(2, 2, generator=generator) + torch.tensor([[0.1], [0.8]])
            out = step(a, b, pos_a, pos_b, a > 0.2, b > 0.2)  # channel-first image masks
            optimizer.zero_grad()
            out.total.backward()
            optimizer.step()
    return {"before": before, "after": criterion.head.state_dict(),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}


def main(rank: int, world: int, port: int, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.save({mode: train(mode, rank) for mode in ("model", "apart", "unregistered")}, path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
