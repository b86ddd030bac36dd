"""KV-cached any-order group decoding, dynamic resampling, infilling and sampling (docs/decode.md).

    from a3jax.decode import infill, generate
    out = infill(cfg, params, tokens, known, order="left_to_right", group_size=4, temperature=0.0,
                 seed=0, use_cache=True)
    new = generate(cfg, params, prompts, max_new_tokens=64, order="left_to_right", group_size=1)
    new = generate(cfg, params, prompts, 64, temperature=1.0, speculative=4)  # exact, fewer passes
"""
from a3jax.decode.decoder import MODES, DecodeError, DecodeResult, generate, infill
from a3jax.decode.orders import DYNAMIC_ORDERS, FIXED_ORDERS, ORDERS

__all__ = ["generate", "infill", "DecodeError", "DecodeResult", "ORDERS", "FIXED_ORDERS", "DYNAMIC_ORDERS",
           "MODES"]
