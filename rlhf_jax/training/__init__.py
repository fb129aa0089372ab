"""Supervised training: losses, jitted steps, the training loop and resumption."""
