"""Weight conversion: HF LLaMA and the reference A3 code <-> a3jax. Only `.bin` readers/writers import
torch, lazily; nothing here imports transformers."""
from a3jax.convert.hf import ConversionError, TensorReader, config_from_hf, config_to_hf, from_hf, to_hf
from a3jax.convert.official import from_official, to_official

__all__ = ["ConversionError", "TensorReader", "config_from_hf", "config_to_hf", "from_hf", "to_hf",
           "from_official", "to_official"]
