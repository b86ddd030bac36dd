"""Weight conversion: HF LLaMA, the reference A3 code and GGUF (llama.cpp) <-> a3jax. Only `.bin`
readers/writers import torch, lazily; nothing here imports transformers."""
from a3jax.convert.gguf_io import config_from_gguf, from_gguf
from a3jax.convert.gguf_tokenizer import build_tokenizer, write_tokenizer
from a3jax.convert.hf import ConversionError, TensorReader, config_from_hf, config_to_hf, from_hf, to_hf
from a3jax.convert.reference import from_reference, to_reference

__all__ = ["ConversionError", "TensorReader", "config_from_hf", "config_to_hf", "from_hf", "to_hf",
           "from_reference", "to_reference", "from_gguf", "config_from_gguf", "build_tokenizer", "write_tokenizer"]
