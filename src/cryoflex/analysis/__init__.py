"""Analysis of trained runs: latent embeddings, decoded structures, metrics against ground truth."""

# Posterior draws per particle for its structure and spread (--posterior-samples). At SNR 0.001, 64 draws against 16
# ranked the errors better (spread/error Spearman 0.30 against 0.23) for 4x the rendering (docs/low_snr.md). Kept here,
# free of torch, so the command line can show it without importing torch.
DEFAULT_POSTERIOR_SAMPLES = 64
