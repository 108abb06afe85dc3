"""Stand-in for torchvision.transforms.functional in the original cryoSPHERE's benchmark environment (not torchvision).

compare_original.py copies this file to torchvision/transforms/functional.py in that environment's site-packages.
cryoSPHERE 0.6.1 imports torchvision only for resize(), which its ImageDataSet calls to downsample particle images
(and only when the downsampled box differs from the original one). Installing the real torchvision from PyPI would
pull a torch build of its own; this module provides that one function on torch alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def resize(image: torch.Tensor, size: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of a (C, H, W) or (N, C, H, W) tensor to size (height, width), as torchvision's default mode.

    Only the form cryoSPHERE uses is accepted: an explicit (height, width), bilinear, half-pixel centres.
    """
    if len(size) != 2:
        raise ValueError(f"this stand-in resizes to an explicit (height, width), not {size!r}")
    batched = image if image.ndim == 4 else image[None]
    resized = F.interpolate(batched, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    return resized if image.ndim == 4 else resized[0]
