"""Data pipeline for training: Fourier-crop downsampling, the particle Dataset and structure placement."""

from cryoflex.data.dataset import CTF_FIELDS, ImageNormalisation, ParticleDataset, estimate_normalisation
from cryoflex.data.downsample import downsampled_pixel_size_A, fourier_crop
from cryoflex.data.placement import box_centre_from_map_A, place_structure_A

__all__ = [
    "CTF_FIELDS",
    "ImageNormalisation",
    "ParticleDataset",
    "box_centre_from_map_A",
    "downsampled_pixel_size_A",
    "estimate_normalisation",
    "fourier_crop",
    "place_structure_A",
]
