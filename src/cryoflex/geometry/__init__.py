"""Rotations and the conventions that connect them to RELION, cryoSPARC and cryoDRGN."""
