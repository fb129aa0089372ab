"""rlhf_jax: the InstructGPT recipe (SFT, K-way ranking reward model, PPO) in JAX/Flax."""

import os

# transformers serves only tokenizers here (models run in JAX): its import-time advice that PyTorch was not found
# would be printed by every command.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
