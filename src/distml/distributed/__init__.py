"""Distributed training: the runtime (process group, device), strategies, checkpoints, launch."""
