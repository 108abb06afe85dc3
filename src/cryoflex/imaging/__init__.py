"""Image formation: CTF, Gaussian projector, volumes. Pure physics, no neural networks."""
