"""a3jax: JAX/Flax framework for A3 (any-order any-subset autoregressive) language models."""
__version__ = "0.1.0"
