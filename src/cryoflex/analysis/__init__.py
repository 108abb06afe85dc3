"""Analysis of trained runs: latent embeddings, decoded structures, metrics against ground truth."""
