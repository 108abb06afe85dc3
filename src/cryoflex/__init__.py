"""cryoflex: structural heterogeneity in cryo-EM by learned segments and rigid motions (cryoSPHERE)."""

__version__ = "0.1.0"
