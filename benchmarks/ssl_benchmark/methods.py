"""The pre-training methods compared, each a loss on two views of a batch, all on one U-Net.

Every method trains the encoder blocks (``conv_0``, ``down_1`` .. ``down_4``) of the same MONAI
BasicUNet, and only those blocks are transferred to fine-tuning. All but Models Genesis read the
encoder through :class:`pretrain_sal.SALEncoder` (down_2..down_4 fused on the stride-4 grid and
embedded by a 1x1 convolution to ``embed_dim`` channels): the dense methods match on that map, the
global ones pool it. A method's ``views`` says what its two views are: ``"pair"`` two nearby slices
of one volume (SAL), ``"same"`` the same slice twice (the contrastive and reconstruction baselines).

Losses (``z`` unit vectors, ``tau`` a temperature):

- SimCLR (NT-Xent): ``-log exp(z_i . z_j / tau) / sum_{k != i} exp(z_i . z_k / tau)`` over the 2B
  pooled, projected views, ``j`` the other view of ``i``; ``tau = 0.1``.
- PCL (positional contrastive, Zeng et al. 2021): the supervised-contrastive form of the same, with
  every ``k`` whose slice position is within ``0.1`` of ``i``'s a positive (the two views of a slice
  included); ``tau = 0.1``.
- DenseCL (Wang et al. 2021): ``0.5 * SimCLR + 0.5 * dense``; the dense term takes each foreground
  pixel of one view's projected map, its positive is the pixel of the other view that its backbone
  feature matches best (``salign_kernels.dense_match``, the full N x N argmax), its negatives the
  pooled keys of the batch's other images; ``tau = 0.2``. No momentum encoder or queue (a batch of
  negatives), as in SimCLR.
- Models Genesis (Zhou et al. 2019): the full U-Net restores the slice from a transformed copy
  (a non-linear intensity curve, local pixel shuffling, in- or out-painting); mean squared error.
- SAL (this library): ``SALoss`` on two nearby slices, local alignment dense (LA) or in a 7 x 7
  window (WLA), plus the global positional loss (``gp_weight = 1``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import pretrain_sal  # noqa: E402  (build_unet, SALEncoder)
from finetune import ENCODER_BLOCKS  # noqa: E402  (the blocks fine-tuning loads)

import salign_kernels as sk  # noqa: E402


def masked_mean(features: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C)``: the mean over each sample's foreground (all pixels without one)."""
    if mask is None:
        return features.mean(dim=(2, 3))
    weight = mask.to(features.dtype).unsqueeze(1)
    return (features * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1.0)


def nt_xent(z: torch.Tensor, positives: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised-contrastive NT-Xent: mean over anchors of ``-mean_{p in P(i)} log softmax_i(p)``.

    ``z`` ``(M, D)`` unit rows; ``positives`` ``(M, M)`` bool, no diagonal. With one positive per row it is
    SimCLR's loss. Rows without a positive are left out.
    """
    logits = z @ z.t() / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(1)
    keep = count > 0
    per_anchor = -(log_prob.masked_fill(~positives, 0).sum(1)[keep] / count[keep])
    return per_anchor.mean()


def projector(width: int, out: int = 64, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class Method(nn.Module):
    """A pre-training objective over a U-Net's encoder. ``forward`` returns the scalar loss."""

    views = "same"

    def __init__(self, embed_dim: int, out_channels: int = 3) -> None:
        super().__init__()
        self.unet = pretrain_sal.build_unet(out_channels=out_channels)
        self.encoder = pretrain_sal.SALEncoder(self.unet, embed_dim)

    def encoder_state(self) -> Dict[str, torch.Tensor]:
        """The transferred weights: the U-Net's encoder blocks."""
        return {k: v.detach().clone() for k, v in self.unet.state_dict().items() if k.startswith(ENCODER_BLOCKS)}

    def encode(self, view_a, view_b, mask_a, mask_b):
        """Both views' dense features ``(B, embed_dim, S/4, S/4)`` and their masks on that grid."""
        feat_a, feat_b = self.encoder(torch.cat([view_a, view_b])).chunk(2)  # instance norm: one pass = two
        if mask_a is not None:
            mask_a, mask_b = sk.feature_mask(mask_a, feat_a.shape[2:]), sk.feature_mask(mask_b, feat_b.shape[2:])
        return feat_a, feat_b, mask_a, mask_b


class SimCLR(Method):
    tau = 0.1

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim)
        self.project = projector(embed_dim)

    def embeddings(self, feat_a, feat_b, mask_a, mask_b) -> torch.Tensor:
        z = torch.cat([self.project(masked_mean(feat_a, mask_a)), self.project(masked_mean(feat_b, mask_b))])
        return F.normalize(z, dim=1)

    def positives(self, batch: int, pos_a, device) -> torch.Tensor:
        index = torch.arange(2 * batch, device=device)
        return index[:, None] == (index[None, :] + batch) % (2 * batch)

    def forward(self, view_a, view_b, pos_a, pos_b, mask_a, mask_b):
        feat_a, feat_b, mask_a, mask_b = self.encode(view_a, view_b, mask_a, mask_b)
        z = self.embeddings(feat_a, feat_b, mask_a, mask_b)
        return nt_xent(z, self.positives(len(view_a), pos_a, z.device), self.tau)


class PCL(SimCLR):
    threshold = 0.1

    def positives(self, batch: int, pos_a, device) -> torch.Tensor:
        pos = torch.cat([pos_a, pos_a]).to(device)  # both views of a slice share its position
        close = (pos[:, None] - pos[None, :]).abs() < self.threshold
        return close & ~torch.eye(2 * batch, dtype=torch.bool, device=device)


class DenseCL(SimCLR):
    tau_dense = 0.2

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim)
        self.project_dense = nn.Sequential(nn.Conv2d(embed_dim, 128, 1), nn.ReLU(inplace=True),
                                           nn.Conv2d(128, 64, 1))

    def dense_term(self, q_map, k_map, feat_q, feat_k, mask_q, mask_k) -> torch.Tensor:
        """Each foreground pixel of ``q_map`` against its backbone match in ``k_map`` (positive) and the
        pooled keys of the other images (negatives)."""
        B, D = q_map.shape[:2]
        _, index = sk.dense_match(feat_q.detach().float(), feat_k.detach().float(), mask_a=mask_q, mask_b=mask_k)
        q = F.normalize(q_map, dim=1).flatten(2).transpose(1, 2)  # (B, N, D)
        k = F.normalize(k_map, dim=1).flatten(2).transpose(1, 2)
        valid = index.flatten(1) >= 0  # (B, N)
        positive = torch.gather(k, 1, index.flatten(1).clamp_min(0).unsqueeze(-1).expand(-1, -1, D))
        pooled = F.normalize(masked_mean(k_map, mask_k), dim=1)  # (B, D): each image's global key
        pos_logit = (q * positive).sum(-1, keepdim=True) / self.tau_dense  # (B, N, 1)
        neg_logit = q @ pooled.t() / self.tau_dense  # (B, N, B)
        own = torch.eye(B, dtype=torch.bool, device=q.device)[:, None, :].expand_as(neg_logit)
        logits = torch.cat([pos_logit, neg_logit.masked_fill(own, float("-inf"))], dim=-1)
        loss = -torch.log_softmax(logits, dim=-1)[..., 0]
        return loss[valid].mean()

    def forward(self, view_a, view_b, pos_a, pos_b, mask_a, mask_b):
        feat_a, feat_b, mask_a, mask_b = self.encode(view_a, view_b, mask_a, mask_b)
        z = self.embeddings(feat_a, feat_b, mask_a, mask_b)
        global_term = nt_xent(z, self.positives(len(view_a), pos_a, z.device), self.tau)
        q_a, q_b = self.project_dense(feat_a), self.project_dense(feat_b)
        dense = 0.5 * (self.dense_term(q_a, q_b, feat_a, feat_b, mask_a, mask_b)
                       + self.dense_term(q_b, q_a, feat_b, feat_a, mask_b, mask_a))
        return 0.5 * global_term + 0.5 * dense


class ModelsGenesis(Method):
    """Restore the slice from a corrupted copy with the whole U-Net (one output channel)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__(embed_dim, out_channels=1)

    def forward(self, view_a, view_b, pos_a, pos_b, mask_a, mask_b):
        corrupted = genesis_corrupt(view_a, generator_for(view_a))
        return F.mse_loss(self.unet(corrupted), view_a)


def generator_for(x: torch.Tensor) -> torch.Generator:
    """A generator seeded from the global one, so a run is reproducible under ``torch.manual_seed``."""
    return torch.Generator(device=x.device).manual_seed(int(torch.randint(0, 2**62, ()).item()))


def genesis_corrupt(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Models Genesis' transformations of a ``(B, 1, S, S)`` batch in [0, 1], each sample its own draw:
    a monotone non-linear intensity curve (p 0.9, reversed with p 0.5), local pixel shuffling in 8x8
    blocks (p 0.5), then in-painting (p 0.5: random boxes filled with noise) or else out-painting (p 0.8:
    all but random boxes filled with noise)."""
    B, _, S, _ = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=x.device)
    out = x.clone()
    for b in range(B):
        image = out[b, 0]
        if rand(()) < 0.9:  # a cubic Bezier curve through (0,0), (p1), (p2), (1,1), as a lookup
            p = rand(4)
            t = torch.linspace(0, 1, 256, device=x.device)
            xs = 3 * (1 - t) ** 2 * t * p[0] + 3 * (1 - t) * t**2 * p[2] + t**3
            ys = 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[3] + t**3
            if rand(()) < 0.5:
                ys = 1 - ys
            order = torch.argsort(xs)
            xs, ys = xs[order], ys[order]
            where = torch.searchsorted(xs, image.clamp(0, 1).flatten().contiguous()).clamp(0, 255)
            image = ys[where].reshape(S, S)
        if rand(()) < 0.5:  # shuffle the pixels inside a few 8x8 blocks
            for _ in range(16):
                i, j = (torch.randint(0, S - 8, (2,), generator=gen, device=x.device)).tolist()
                block = image[i:i + 8, j:j + 8].flatten()
                image[i:i + 8, j:j + 8] = block[torch.randperm(64, generator=gen, device=x.device)].reshape(8, 8)
        if rand(()) < 0.5:
            for _ in range(3):
                h, w = (torch.randint(S // 8, S // 3, (2,), generator=gen, device=x.device)).tolist()
                i, j = torch.randint(0, S - h, (1,), generator=gen).item(), torch.randint(0, S - w, (1,), generator=gen).item()
                image[i:i + h, j:j + w] = rand(h, w)
        elif rand(()) < 0.8:
            keep = torch.zeros(S, S, dtype=torch.bool, device=x.device)
            for _ in range(3):
                h, w = (torch.randint(S // 3, S // 2, (2,), generator=gen, device=x.device)).tolist()
                i, j = torch.randint(0, S - h, (1,), generator=gen).item(), torch.randint(0, S - w, (1,), generator=gen).item()
                keep[i:i + h, j:j + w] = True
            image = torch.where(keep, image, rand(S, S))
        out[b, 0] = image
    return out


class SAL(Method):
    views = "pair"

    def __init__(self, embed_dim: int, window: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__(embed_dim)
        self.criterion = sk.SALoss(embed_dim, window=window, symmetric=True, gp_weight=1.0, backend=backend)

    def forward(self, view_a, view_b, pos_a, pos_b, mask_a, mask_b):
        feat_a, feat_b, mask_a, mask_b = self.encode(view_a, view_b, mask_a, mask_b)
        return self.criterion(feat_a, feat_b, pos_a, pos_b, mask_a, mask_b).total


#: name -> (constructor(embed_dim), augment the views). "random" has no pre-training.
METHODS = {
    "SimCLR": (SimCLR, True),
    "PCL": (PCL, True),
    "DenseCL": (DenseCL, True),
    "ModelsGenesis": (ModelsGenesis, False),  # its own corruptions are its augmentation
    "SAL-LA": (lambda d: SAL(d), False),
    "SAL-WLA": (lambda d: SAL(d, window=7), False),
    "SAL-LA+aug": (lambda d: SAL(d), True),
    "SAL-WLA+aug": (lambda d: SAL(d, window=7), True),
}
