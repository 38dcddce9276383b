"""Training: the losses (and, next, the DDP trainer)."""
