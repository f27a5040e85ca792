"""The training loop, checkpoints and the candidate runner."""
