"""The generic training loop on accelerate, checkpoints and logs."""
