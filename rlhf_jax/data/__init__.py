"""Datasets for every stage: importers of public and user formats, TFDS array_record preparation, and grain
pipelines (`python -m rlhf_jax.data --help` prepares one)."""
