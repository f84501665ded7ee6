"""Independent augmentations of a pair's two views (MONAI transforms), the same recipe for every method.

Each view gets its own draw of: a small affine (rotation up to 10 degrees, scale +-10%, shift up to
4 pixels; applied to the image and, nearest-neighbour, to its foreground mask), a gamma change of
contrast, an intensity scale, Gaussian blur and Gaussian noise. The strength was fixed before any
run and not tuned: small enough that two views of one slice still show the same anatomy in about the
same place, large enough that a pixel's intensity no longer identifies its match.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


class ViewAugmenter:
    """``(images, masks) -> (augmented images, masks)``, each sample its own random draw.

    Shape: ``images`` ``(B, 1, S, S)`` float in [0, 1]; ``masks`` ``(B, 1, S, S)`` bool or None.
    Deterministic given ``seed`` (one MONAI random state, drawn in order).
    """

    def __init__(self, seed: int) -> None:
        from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                      RandGaussianSmoothd, RandScaleIntensityd)

        self.transform = Compose([
            RandAffined(("image", "mask"), prob=0.8, rotate_range=math.radians(10), scale_range=0.1,
                        translate_range=(4, 4), mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandAdjustContrastd("image", prob=0.5, gamma=(0.7, 1.5)),
            RandScaleIntensityd("image", factors=0.15, prob=0.5),
            RandGaussianSmoothd("image", sigma_x=(0.25, 1.0), sigma_y=(0.25, 1.0), prob=0.3),
            RandGaussianNoised("image", prob=0.5, std=0.03),
        ])
        self.transform.set_random_state(seed)

    def __call__(self, images: torch.Tensor, masks: Optional[torch.Tensor]) -> Tuple[torch.Tensor,
                                                                                      Optional[torch.Tensor]]:
        out_images, out_masks = [], []
        for b in range(images.shape[0]):
            mask = masks[b].float() if masks is not None else torch.ones_like(images[b])
            item = self.transform({"image": images[b].float(), "mask": mask})
            out_images.append(plain(item["image"]).clamp(0, 1))
            out_masks.append(plain(item["mask"]) > 0.5)
        images = torch.stack(out_images).to(images.dtype)
        return images, (torch.stack(out_masks) if masks is not None else None)


def plain(x) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain tensor, so no metadata travels into the model."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
