"""Image formation: typed CTF and pose batches, the CTF, the Gaussian projector, their composition (formation) and
volumes. Pure physics, no neural networks."""
