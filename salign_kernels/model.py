"""An encoder and its SAL loss in one module: what a training loop, DDP or an engine wraps.

``SALoss`` owns parameters (its positional head). Held with the encoder in one module, a single
``DistributedDataParallel(model)`` averages the head's gradients with the encoder's and a single
``optimizer(model.parameters())`` trains both; held apart, either is easy to forget, and nothing
fails when it is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .losses import SALoss, SALossOutput
from .masks import feature_mask


class SALModel(nn.Module):
    """An encoder and its :class:`SALoss`: images in, the SAL objective out.

    Args:
        encoder: an ``nn.Module`` mapping images ``(B, 1, *spatial)`` to features
            ``(B, C, *feature_spatial)`` (2D or 3D) with ``C`` the criterion's ``in_channels``.
        criterion: the :class:`SALoss` whose head trains with the encoder.

    Raises:
        TypeError: ``encoder`` is not an ``nn.Module`` or ``criterion`` is not a :class:`SALoss`.

    Example:
        >>> model = SALModel(encoder, SALoss(in_channels=64, window=7))
        >>> model = torch.nn.parallel.DistributedDataParallel(model)       # under torchrun
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)     # encoder and head
        >>> out = model(batch["slice_a"], batch["slice_b"], batch["pos_a"], batch["pos_b"])
        >>> out.total.backward()
    """

    def __init__(self, encoder: nn.Module, criterion: SALoss) -> None:
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module; got {type(encoder).__name__}")
        if not isinstance(criterion, SALoss):
            raise TypeError(f"criterion must be a SALoss; got {type(criterion).__name__}")
        self.encoder, self.criterion = encoder, criterion

    def forward(
        self,
        image_a: torch.Tensor,
        image_b: torch.Tensor,
        pos_a: torch.Tensor,
        pos_b: torch.Tensor,
        mask_a: Optional[torch.Tensor] = None,
        mask_b: Optional[torch.Tensor] = None,
    ) -> SALossOutput:
        """Encode both images of each pair and return their SAL objective.

        Args:
            image_a: ``(B, 1, H, W)`` slices (or ``(B, 1, D, H, W)`` crops), as the encoder takes.
            image_b: the other image of each pair, the same shape as ``image_a``.
            pos_a: floating ``(B,)`` positions in [0, 1] (``(B, pos_dims)`` for the criterion's
                ``pos_dims > 1``).
            pos_b: the same shape as ``pos_a``.
            mask_a: optional bool foreground mask at image resolution, ``(B, *spatial)`` or
                channel-first ``(B, 1, *spatial)``; brought to the feature grid with
                :func:`salign_kernels.feature_mask` (a cell is foreground when any of its pixels is).
            mask_b: the same for ``image_b``.

        Returns:
            :class:`SALossOutput` ``(total, local, positional)``, scalar tensors.

        Raises:
            TypeError, ValueError: from :func:`feature_mask` and :class:`SALoss`, for masks,
                features and positions they reject, naming the argument.
        """
        # Each image through the encoder on its own: one concatenated pass would be faster, but
        # would mix the pairs' statistics for an encoder with batch norm.
        feat_a, feat_b = self.encoder(image_a), self.encoder(image_b)
        mask_a = None if mask_a is None else feature_mask(mask_a, feat_a)
        mask_b = None if mask_b is None else feature_mask(mask_b, feat_b)
        return self.criterion(feat_a, feat_b, pos_a, pos_b, mask_a, mask_b)
