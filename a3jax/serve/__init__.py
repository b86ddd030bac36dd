"""`a3jax serve`: OpenAI-compatible HTTP over the decode engine, with continuous batching
(docs/serve.md).

    from a3jax.serve import ServeOptions, create_app
    app = create_app(Engine.load("runs/x/final"), ServeOptions(slots=8, max_len=512))

Modules: slots (the slot-level decoder: fixed-shape lanes), scheduler (the thread that batches),
app (routes and wire format), protocol (request bodies), metrics (Prometheus), chat (templates),
cli (the command).
"""
from a3jax.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
