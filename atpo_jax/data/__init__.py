"""Datasets, prompts and the synthetic multi-hop world (no JAX needed)."""
