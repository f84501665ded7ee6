"""Glue for training engines that expect ``network(inputs) -> pred`` and ``loss(pred, target)``.

MONAI's ``SupervisedTrainer`` computes ``loss_function(inferer(inputs, network, *args, **kwargs),
targets).mean()``. SAL has no target: with a :class:`salign_kernels.SALModel` as the network, the
pair goes in as ``inputs`` plus ``args`` / ``kwargs`` (:class:`SALPrepareBatch`), the network's
output is the whole :class:`salign_kernels.SALossOutput`, and :func:`sal_total` hands the engine its
``total`` (the parts stay in ``engine.state.output["pred"]`` for logging). Nothing here imports MONAI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from .losses import SALossOutput


def _check_keys(value, name: str) -> Tuple[str, str]:
    if (isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2
            or not all(isinstance(key, str) for key in value)):
        raise TypeError(f"{name} must be a pair of str keys; got {value!r}")
    return tuple(value)


class SALPrepareBatch:
    """A MONAI ``prepare_batch``: a batch of pairs -> ``(image_a, None, (image_b, pos_a, pos_b), masks)``.

    The engine then calls ``network(image_a, image_b, pos_a, pos_b, mask_a=..., mask_b=...)``,
    which is :meth:`salign_kernels.SALModel.forward`; the target is None.

    Args:
        image_keys: the batch's two images: ``("slice_a", "slice_b")`` for
            :class:`~salign_kernels.data.SlicePairDataset`, ``("crop_a", "crop_b")`` for
            :class:`~salign_kernels.data.SubVolumePairDataset`.
        pos_keys: the batch's two positions.
        mask_keys: the optional masks: passed on when the batch has them (at image resolution:
            ``SALModel`` brings them to the feature grid).

    Raises:
        TypeError: a keys argument is not a pair of strings.

    Example:
        >>> trainer = SupervisedTrainer(device, max_epochs, loader, network=SALModel(encoder, criterion),
        ...                             optimizer=optimizer, loss_function=sal_total,
        ...                             prepare_batch=SALPrepareBatch(), decollate=False)
    """

    def __init__(
        self,
        image_keys: Sequence[str] = ("slice_a", "slice_b"),
        pos_keys: Sequence[str] = ("pos_a", "pos_b"),
        mask_keys: Sequence[str] = ("mask_a", "mask_b"),
    ) -> None:
        self.image_keys = _check_keys(image_keys, "image_keys")
        self.pos_keys = _check_keys(pos_keys, "pos_keys")
        self.mask_keys = _check_keys(mask_keys, "mask_keys")

    def __call__(
        self,
        batchdata: Mapping,
        device: Optional[Union[str, torch.device]] = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> Tuple[torch.Tensor, None, Tuple[torch.Tensor, torch.Tensor, torch.Tensor], Dict[str, torch.Tensor]]:
        """Move a batch's pair to ``device``.

        Args:
            batchdata: a mapping (a collated batch) with the image and position keys: images
                ``(B, 1, *spatial)``, positions ``(B,)`` or ``(B, K)``, optional bool masks.
            device: where the tensors go (None: where they are).
            non_blocking: passed to ``Tensor.to``.
            kwargs: further ``Tensor.to`` arguments (the engine's ``to_kwargs``).

        Returns:
            ``(image_a, None, (image_b, pos_a, pos_b), {"mask_a": ..., "mask_b": ...})``, the masks
            dict empty when the batch has none.

        Raises:
            TypeError: ``batchdata`` is not a mapping.
            ValueError: ``batchdata`` lacks an image or position key.
        """
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"batchdata must be a mapping of a pair batch; got {type(batchdata).__name__}")
        missing = [key for key in (*self.image_keys, *self.pos_keys) if key not in batchdata]
        if missing:
            raise ValueError(f"batchdata lacks the keys {missing}; got keys {sorted(map(str, batchdata))}")

        def move(key: str) -> torch.Tensor:
            return torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking, **kwargs)

        image_a, image_b = (move(key) for key in self.image_keys)
        pos_a, pos_b = (move(key) for key in self.pos_keys)
        # A mask keeps its bool dtype: only the device moves (to_kwargs may carry a dtype or memory format).
        masks = {name: torch.as_tensor(batchdata[key]).to(device=device, non_blocking=non_blocking)
                 for name, key in zip(("mask_a", "mask_b"), self.mask_keys) if key in batchdata}
        return image_a, None, (image_b, pos_a, pos_b), masks


def sal_total(output: SALossOutput, target: Optional[Any] = None) -> torch.Tensor:
    """A MONAI ``loss_function`` for a :class:`~salign_kernels.SALModel` network: ``output.total``.

    Args:
        output: the network's :class:`~salign_kernels.SALossOutput`.
        target: ignored (SAL is self-supervised; :class:`SALPrepareBatch` gives None).

    Returns:
        the scalar ``total``, the tensor the engine backpropagates.

    Raises:
        TypeError: ``output`` is not a :class:`~salign_kernels.SALossOutput` (e.g. the network is
            an encoder rather than a ``SALModel``).
    """
    if not isinstance(output, SALossOutput):
        raise TypeError(f"output must be a SALossOutput (the network should be a SALModel); got "
                        f"{type(output).__name__}")
    return output.total
