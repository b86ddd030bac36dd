"""KV-cached any-order group decoding, dynamic resampling, infilling, sampling and the Engine
(docs/decode.md).

    from a3jax.decode import Engine, DecodeSpec, SamplingParams, generate, infill
    eng = Engine.load("runs/x/final")
    out = eng.generate(["def fib(n):"], max_new_tokens=64, spec=DecodeSpec(group_size=4),
                       sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=0))
    res = infill(cfg, params, tokens, known, DecodeSpec(order="confidence", group_size=2))
    res = generate(cfg, params, prompts, 64, DecodeSpec(speculative=4), SamplingParams(temperature=1.0))
"""
from a3jax.decode.api import generate, infill
from a3jax.decode.engine import Completion, Engine, Infilled, Scored
from a3jax.decode.orders import DYNAMIC_ORDERS, FIXED_ORDERS, ORDERS
from a3jax.decode.spec import MODES, DecodeError, DecodeResult, DecodeSpec, SamplingParams

__all__ = ["generate", "infill", "Engine", "Completion", "Infilled", "Scored", "DecodeSpec", "SamplingParams",
           "DecodeError", "DecodeResult", "ORDERS", "FIXED_ORDERS", "DYNAMIC_ORDERS", "MODES"]
