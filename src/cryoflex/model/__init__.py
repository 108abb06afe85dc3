"""The cryoSPHERE model: segmentation, networks, deformation, losses."""
