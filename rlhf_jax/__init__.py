"""rlhf_jax: the InstructGPT recipe (SFT, K-way ranking reward model, PPO) in JAX/Flax."""

__version__ = "0.1.0"
