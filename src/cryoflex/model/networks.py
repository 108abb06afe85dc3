"""Encoder (image -> q(z | image)) and decoder (z -> one rigid motion per segment), both multilayer perceptrons.

The decoder outputs, per segment, a rotation vector (axis * angle, radians) and a translation (A). A rotation vector
is a sound parametrisation for the moderate rotations of domain motions: every output is a valid rotation (nothing
to normalise, unlike a raw quaternion), zero is the identity, and it is smooth there. The output layer starts at zero,
so training starts from the nominal structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cryoflex.data.downsample import fourier_crop

_MIN_LATENT_STD = 1e-4
ENCODER_MIN_BOX_PX = 32  # automatic encoder boxes stop here: enough pixels for a particle's domains at any box


def encoder_box_px(box_size_px: int, downsample_factor: int) -> int:
    """The box the encoder reads: the training box over `downsample_factor`, even, at least ENCODER_MIN_BOX_PX
    (and never more than the training box); factor 1 is the full box."""
    if downsample_factor == 1:
        return box_size_px
    reduced = box_size_px // downsample_factor
    return min(box_size_px, max(ENCODER_MIN_BOX_PX, reduced - reduced % 2))


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers of the given sizes with LeakyReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for k, (size_in, size_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(size_in, size_out))
        if k < len(sizes) - 2:
            layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Image (B, D, D) -> mean and std (B, L) of q(z | image); std = softplus + 1e-4, never 0.

    The image is first Fourier-cropped to `input_box_px` (the full box by default). Its first layer is most of the
    encoder's cost, in proportion to the pixels it reads, and domain motions show at half the training resolution.
    In training mode each hidden unit is dropped with probability `dropout`: without it the encoder memorises the
    particles it trains on by their noise and reads new ones poorly (docs/low_snr.md, "Dropout in the encoder").
    """

    def __init__(
        self,
        box_size_px: int,
        latent_dim: int,
        hidden: Sequence[int] = (512, 256),
        input_box_px: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.input_box_px = box_size_px if input_box_px is None else input_box_px
        self.dropout = dropout
        self.net = mlp([self.input_box_px * self.input_box_px, *hidden, 2 * latent_dim])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = fourier_crop(images, self.input_box_px).flatten(1)
        for layer in self.net:  # dropout after each activation, outside the Sequential: checkpoints keep their keys
            out = layer(out)
            if isinstance(layer, nn.LeakyReLU):
                out = F.dropout(out, self.dropout, self.training)
        mean, raw_std = out.split(self.latent_dim, dim=1)
        return mean, F.softplus(raw_std) + _MIN_LATENT_STD


class Decoder(nn.Module):
    """Latent (B, L) -> rotation vectors (B, M, 3) in radians and translations (B, M, 3) in A."""

    def __init__(
        self, latent_dim: int, n_segments: int, hidden: Sequence[int] = (256, 256), translation_scale_A: float = 10.0
    ):
        super().__init__()
        self.n_segments = n_segments
        self.translation_scale_A = translation_scale_A
        self.net = mlp([latent_dim, *hidden, 6 * n_segments])
        output = self.net[-1]
        assert isinstance(output, nn.Linear), "mlp() ends with a Linear layer"
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(latent).view(-1, self.n_segments, 6)
        return out[..., :3], out[..., 3:] * self.translation_scale_A
