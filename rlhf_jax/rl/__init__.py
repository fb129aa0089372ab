"""PPO: its math (GAE, whitening, clipped losses, KL controller) and the iteration; never imports config."""
