"""Data pipeline for training: Fourier-crop downsampling, the particle Dataset and its batches, structure placement."""

from cryoflex.data.batch import ParticleBatch
from cryoflex.data.dataset import ImageNormalisation, ParticleDataset, estimate_normalisation, particle_loader
from cryoflex.data.downsample import downsampled_pixel_size_A, fourier_crop
from cryoflex.data.placement import box_centre_from_map_A, map_extent_A, place_structure_A

__all__ = [
    "ImageNormalisation",
    "ParticleBatch",
    "ParticleDataset",
    "box_centre_from_map_A",
    "map_extent_A",
    "downsampled_pixel_size_A",
    "estimate_normalisation",
    "fourier_crop",
    "particle_loader",
    "place_structure_A",
]
