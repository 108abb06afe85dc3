"""Training: building a run from its configuration, the loop, checkpoints and distributed launch."""
