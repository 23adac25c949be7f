"""Training: optimizers, the training step, checkpoints."""
