"""Counting XLA compiles: how the tests hold that a warmed-up path compiles nothing new."""
import contextlib

import jax


@contextlib.contextmanager
def counting_compiles():
    """Yields a list that grows by one per XLA compile while the block runs."""
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)

