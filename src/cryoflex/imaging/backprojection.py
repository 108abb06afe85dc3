"""Direct Fourier inversion: particle images -> 3-D map by the central-slice theorem, CTF-weighted, Wiener-regularised.

Physics (docs/conventions.md, "Image pixel grid", "Rotations and projection", "Origins", "CTF"):
- The projection along z of the rotated structure V(R^T x') has the 2-D transform V^(R^T (kx, ky, 0)): each image's
  transform is the central slice of the map's transform at the 3-D frequencies q = R^T k, i.e.
  q = kx R[0, :] + ky R[1, :] (the rows of R), with rotations x' = R x.
- Each image (D x D, centre pixel D//2) is zero-padded to N = padding * D pixels (same pixel size, finer Fourier
  sampling), transformed with rfft2, and given the phase that refers it to its centre pixel and undoes its RELION
  origin (observed(x) = centred(x + origin), so centred(k) = observed(k) exp(-2 pi i k . origin)); the shift is applied
  on the padded grid, so it is periodic over N pixels, not over the D-pixel box.
- numerator += CTF * F and weights += CTF^2 (CTF from cryoflex.imaging.ctf on the padded rfft grid, RELION sign), each
  spread over the 8 grid points around q with trilinear weights (scatter-add with index_add_, batched over images).
  Only frequencies below Nyquist (|k| < N//2 padded grid units) are inserted.
- Hermitian symmetry: the grid is the half spectrum of a real map, (N, N, N//2 + 1) indexed [z, y, x] with kz, ky
  centred at N//2 and kx >= 0 at index kx. Each rfft2 pixel stands for itself and its Friedel mate; it is inserted
  once, on the kx >= 0 side (q -> -q with the conjugate value when q_x < 0; the CTF is even). The rfft2 column kx = 0
  holds both members of its pairs, so it is inserted with weight 1/2. The plane kx = 0 of the 3-D grid is its own
  mirror: volume() adds to it its conjugate mirror, which makes it equal to what a full grid would hold. This halves
  the memory and the scatter work of a full grid.
- volume(): numerator / (weights + wiener), inverse 3-D FFT, crop to the central D^3, divide by the trilinear kernel's
  real-space transform sinc^2(r / N) per axis (r the voxel offset from the centre on the padded grid: the gridding
  correction), times 1 / pixel_size_A so the map has the units of cryoflex.imaging.volume.gaussian_volume (the image
  is a line integral of that density). The map is on gaussian_volume's grid: voxel (k, i, j) at
  ((j - D//2) a, (i - D//2) a, (k - D//2) a), so it overlays the structures and the model maps.

Memory per accumulator: one float32 grid (N, N, N//2 + 1, 3) (numerator real and imaginary part, weights), i.e.
12 N^2 (N/2 + 1) bytes with N = padding * D: 0.81 GB at 256 px with padding 2 (N = 512), 0.10 GB at 256 px with
padding 1 or at 128 px with padding 2, 0.013 GB at 64 px with padding 2. volume() needs about 3 times that again
while it runs (the complex quotient and the inverse FFT). insert() holds O(B N^2) temporaries (about 60 MB for a
batch of 64 at N = 512 per corner pass).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryoflex.imaging.batches import CTFBatch, PoseBatch
from cryoflex.imaging.ctf import ctf_rfft

DEFAULT_WIENER = 1e-3  # relative regularisation (1/SNR) of volume(): enough to tame sparsely sampled voxels
_Z_CHUNK = 32  # z planes of the padded grid processed at once in volume()


class FourierAccumulator:
    """CTF-weighted central slices of particle images summed on a 3-D Fourier grid (direct Fourier inversion)."""

    def __init__(
        self, box_size_px: int, pixel_size_A: float, *, padding: int = 2, device: torch.device | str = "cpu"
    ) -> None:
        if box_size_px < 2 or not pixel_size_A > 0 or padding < 1:
            raise ValueError(
                f"need box_size_px >= 2, pixel_size_A > 0, padding >= 1; got {box_size_px}, {pixel_size_A}, {padding}"
            )
        self.box_size_px = box_size_px
        self.pixel_size_A = float(pixel_size_A)
        self.padding = padding
        self.device = torch.device(device)
        self.n_images = 0
        n = padding * box_size_px
        self.padded_size_px = n
        # numerator real, numerator imaginary, weights
        self._grid = torch.zeros(n, n, n // 2 + 1, 3, dtype=torch.float32, device=self.device)
        self._setup_pixels()

    def _setup_pixels(self) -> None:
        """The padded rfft2 pixels inserted (|k| < N//2): flat indices, integer frequencies and Friedel weights."""
        n = self.padded_size_px
        kx = torch.fft.rfftfreq(n, d=1.0 / n, device=self.device)
        ky = torch.fft.fftfreq(n, d=1.0 / n, device=self.device)
        kx_grid, ky_grid = torch.broadcast_tensors(kx[None, :], ky[:, None])
        inside = (kx_grid.square() + ky_grid.square()).flatten() < (n // 2) ** 2
        self._pixels = torch.nonzero(inside).squeeze(1)
        self._kx = kx_grid.flatten()[self._pixels].contiguous()
        self._ky = ky_grid.flatten()[self._pixels].contiguous()
        self._multiplicity = torch.where(self._kx == 0, 0.5, 1.0)

    @torch.no_grad()
    def insert(self, images: torch.Tensor, poses: PoseBatch, ctf: CTFBatch | None) -> None:
        """Insert images (B, D, D) at poses (x' = R x, RELION origins in A) with their CTF (None: no CTF)."""
        d, n = self.box_size_px, self.padded_size_px
        if images.ndim != 3 or images.shape[1:] != (d, d):
            raise ValueError(f"images must have shape (B, {d}, {d}), got {tuple(images.shape)}")
        batch = images.shape[0]
        if len(poses) != batch or (ctf is not None and len(ctf) != batch):
            raise ValueError(f"{batch} images need {batch} poses and CTFs, got {len(poses)} and {ctf and len(ctf)}")
        images = images.to(self.device, dtype=torch.float32)
        poses = poses.to(self.device, dtype=torch.float32)
        spectrum = torch.fft.rfft2(images, s=(n, n)).reshape(batch, -1)[:, self._pixels]
        # refer the phases to the centre pixel D//2 and undo the origin: exp(2 pi i k (D//2 - origin_px) / N)
        centre_minus_origin_px = d // 2 - poses.shifts_A / self.pixel_size_A
        phase = (self._kx * centre_minus_origin_px[:, 0:1] + self._ky * centre_minus_origin_px[:, 1:2]) * (
            2.0 * math.pi / n
        )
        values = spectrum * torch.polar(torch.ones_like(phase), phase)
        if ctf is None:
            values = values * self._multiplicity
            ctf_squared = self._multiplicity.expand(batch, -1)
        else:
            transfer = ctf_rfft(n, self.pixel_size_A, ctf.to(self.device, dtype=torch.float32))
            transfer = transfer.reshape(batch, -1)[:, self._pixels]
            values = values * (transfer * self._multiplicity)
            ctf_squared = transfer.square() * self._multiplicity
        rotations = poses.rotations
        q = self._kx[None, :, None] * rotations[:, None, 0, :] + self._ky[None, :, None] * rotations[:, None, 1, :]
        flip = q[..., 0] < 0
        q = torch.where(flip[..., None], -q, q)
        values = torch.where(flip, values.conj(), values)
        source = torch.stack([values.real, values.imag, ctf_squared], dim=-1)
        self._scatter_trilinear(q, source)
        self.n_images += batch

    def _scatter_trilinear(self, q: torch.Tensor, source: torch.Tensor) -> None:
        """Add source (B, P, 3) at half-grid frequencies q (B, P, 3) = (x >= 0, y, z) to the 8 surrounding voxels."""
        n = self.padded_size_px
        n_x = n // 2 + 1
        flat = self._grid.view(-1, 3)
        position = q.clone()
        position[..., 1:] += n // 2
        lower = position.floor()
        fraction = position - lower
        lower = lower.long()
        x_index = (lower[..., 0], lower[..., 0] + 1)
        y_index = (lower[..., 1] * n_x, ((lower[..., 1] + 1) % n) * n_x)
        z_index = (lower[..., 2] * (n * n_x), ((lower[..., 2] + 1) % n) * (n * n_x))
        x_weight = (1.0 - fraction[..., 0], fraction[..., 0])
        y_weight = (1.0 - fraction[..., 1], fraction[..., 1])
        z_weight = (1.0 - fraction[..., 2], fraction[..., 2])
        for dz in (0, 1):
            for dy in (0, 1):
                zy_index = z_index[dz] + y_index[dy]
                zy_weight = z_weight[dz] * y_weight[dy]
                for dx in (0, 1):
                    index = (zy_index + x_index[dx]).flatten()
                    weight = (zy_weight * x_weight[dx]).unsqueeze(-1)
                    flat.index_add_(0, index, (source * weight).reshape(-1, 3))

    def add(self, other: FourierAccumulator) -> None:
        """Add another accumulator of the same geometry (e.g. a group's halves or batches done elsewhere)."""
        mine = (self.box_size_px, self.pixel_size_A, self.padding)
        theirs = (other.box_size_px, other.pixel_size_A, other.padding)
        if mine != theirs:
            raise ValueError(f"accumulators differ in (box_size_px, pixel_size_A, padding): {mine} vs {theirs}")
        self._grid += other._grid.to(self.device)
        self.n_images += other.n_images

    @torch.no_grad()
    def volume(self, wiener: float | np.ndarray | torch.Tensor = DEFAULT_WIENER) -> torch.Tensor:
        """The (D, D, D) real map [z, y, x] on gaussian_volume's grid: numerator / (weights + regularisation).

        wiener is relative, 1/SNR: the regularisation of each Fourier shell is wiener times that shell's mean weight
        (mean summed CTF^2 over the padded grid's shell), so one value means the same for any number of images and
        any padding. A float applies to every shell; an array gives one value per shell 0..D//2 of the unpadded grid
        (shell round(|k|), as cryoflex.analysis.fsc), e.g. wiener_from_fsc(half-map FSC); the last value also serves
        the corners beyond Nyquist.
        """
        d, n = self.box_size_px, self.padded_size_px
        table = torch.as_tensor(wiener, dtype=torch.float32, device=self.device).reshape(-1)
        if table.numel() not in (1, d // 2 + 1) or not bool(torch.all(table >= 0)):
            raise ValueError(f"wiener must be one value or {d // 2 + 1} values (shells 0..{d // 2}), all >= 0")
        numerator = torch.complex(self._grid[..., 0], self._grid[..., 1])
        weights = self._grid[..., 2].clone()
        _symmetrise_plane(numerator[..., 0], weights[..., 0])
        radii = _HalfGridRadii(n, self.device)
        mean_weight = _shell_means(weights, radii)
        for start in range(0, n, _Z_CHUNK):
            radius = radii(start, min(start + _Z_CHUNK, n))
            unpadded_shell = (radius / self.padding).round().long().clamp(max=table.numel() - 1)
            regularisation = table[unpadded_shell] * mean_weight[radius.round().long()]
            divisor = weights[start : start + _Z_CHUNK] + regularisation
            numerator[start : start + _Z_CHUNK] /= divisor.clamp_min(1e-30)
        del weights
        numerator = torch.fft.ifftshift(numerator, dim=(0, 1))
        padded = torch.fft.irfftn(numerator, s=(n, n, n))
        del numerator
        crop = (torch.arange(d, device=self.device) - d // 2) % n
        cropped = padded[crop][:, crop][:, :, crop]
        kernel = torch.sinc((torch.arange(d, device=self.device, dtype=torch.float32) - d // 2) / n).square()
        correction = kernel[:, None, None] * kernel[None, :, None] * kernel[None, None, :]
        return cropped / (correction * self.pixel_size_A)


def _symmetrise_plane(numerator: torch.Tensor, weights: torch.Tensor) -> None:
    """Make the kx = 0 plane (N, N) [z, y] Hermitian in place: add its conjugate mirror (kz, ky) -> (-kz, -ky)."""
    n = numerator.shape[0]
    mirror = (2 * (n // 2) - torch.arange(n, device=numerator.device)) % n
    numerator += numerator[mirror][:, mirror].conj()
    weights += weights[mirror][:, mirror]


class _HalfGridRadii:
    """|k| of the half grid's voxels in padded Fourier voxels, a z-chunk at a time (the whole grid would be large)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n = n
        centred_squared = (torch.arange(n, device=device, dtype=torch.float32) - n // 2).square()
        self.kz2 = centred_squared[:, None, None]
        self.ky2 = centred_squared[None, :, None]
        self.kx2 = torch.arange(n // 2 + 1, device=device, dtype=torch.float32).square()[None, None, :]
        self.n_shells = int(math.ceil(math.sqrt(3.0) * (n // 2 + 1))) + 1

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return torch.sqrt(self.kz2[start:stop] + self.ky2 + self.kx2)


def _shell_means(weights: torch.Tensor, radii: _HalfGridRadii) -> torch.Tensor:
    """Mean weight of each padded-grid shell round(|k|) over the half grid's voxels."""
    sums = torch.zeros(radii.n_shells, dtype=torch.float64, device=weights.device)
    counts = torch.zeros(radii.n_shells, dtype=torch.float64, device=weights.device)
    for start in range(0, radii.n, _Z_CHUNK):
        shell = radii(start, min(start + _Z_CHUNK, radii.n)).round().long().flatten()
        sums.index_add_(0, shell, weights[start : start + _Z_CHUNK].flatten().double())
        counts.index_add_(0, shell, torch.ones_like(shell, dtype=torch.float64))
    return (sums / counts.clamp_min(1.0)).float()


def lowpass(
    volume: torch.Tensor, pixel_size_A: float, resolution_A: float, *, edge_width_shells: float = 2.0
) -> torch.Tensor:
    """volume (N, N, N) low-passed at 1 / resolution_A with a raised-cosine edge edge_width_shells Fourier voxels wide.

    The gain is 1/2 at the cutoff, 1 below cutoff - width/2, 0 above cutoff + width/2 (a soft edge rings less).
    """
    if not pixel_size_A > 0 or not resolution_A > 0 or not edge_width_shells > 0:
        raise ValueError(f"need positive pixel size, resolution and edge width, got {pixel_size_A}, {resolution_A}")
    n = volume.shape[-1]
    cutoff = n * pixel_size_A / resolution_A
    k = torch.fft.fftfreq(n, d=1.0 / n, device=volume.device)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, device=volume.device)
    radius = torch.sqrt(k.square()[:, None, None] + k.square()[None, :, None] + kx.square()[None, None, :])
    ramp = ((radius - (cutoff - 0.5 * edge_width_shells)) / edge_width_shells).clamp(0.0, 1.0)
    gain = 0.5 * (1.0 + torch.cos(math.pi * ramp))
    return torch.fft.irfftn(torch.fft.rfftn(volume) * gain.to(volume.dtype), s=volume.shape[-3:])


def wiener_from_fsc(fsc: np.ndarray, *, min_fsc: float = 1e-3, max_fsc: float = 0.999) -> torch.Tensor:
    """Per-shell relative regularisation for volume() from a half-map FSC: 1 / SNR of the full map.

    The full map (both halves) has FSC_full = 2 FSC / (1 + FSC) with the truth's expected correlation, and
    SNR = FSC_full / (1 - FSC_full), so 1 / SNR = (1 - FSC) / (2 FSC). Dividing by weights + weights_mean / SNR is the
    Wiener filter of the summed data; FSC is clipped to [min_fsc, max_fsc] so shells without signal get a large but
    finite value and well-measured shells a small positive one.
    """
    clipped = np.clip(np.asarray(fsc, dtype=np.float64), min_fsc, max_fsc)
    return torch.as_tensor((1.0 - clipped) / (2.0 * clipped), dtype=torch.float32)
