"""Weight conversion: HF LLaMA and the reference A3 code <-> a3jax. Only `.bin` readers import torch,
lazily; nothing here imports transformers."""
from a3jax.convert.hf import ConversionError, config_from_hf, from_hf

__all__ = ["ConversionError", "config_from_hf", "from_hf"]
