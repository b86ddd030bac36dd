"""Shared helpers of the conversion tests (no tests here): locally made checkpoints, exact comparison."""
import json
import os

import numpy as np

from a3jax.convert.hf import TensorReader
from hf_models import make_hf_llama


def read_all(model_dir):
    """key -> numpy array of every tensor in a model directory (any supported layout)."""
    r = TensorReader(model_dir)
    try:
        return {k: r.read(k) for k in r.file_of}
    finally:
        r.close()


def assert_bit_exact(a: dict, b: dict, skip=()):
    ka, kb = set(a) - set(skip), set(b) - set(skip)
    assert ka == kb, f"keys differ: only in a {sorted(ka - kb)}, only in b {sorted(kb - ka)}"
    for k in sorted(ka):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype, f"{k}: dtype {x.dtype} vs {y.dtype}"
        assert x.shape == y.shape, f"{k}: shape {x.shape} vs {y.shape}"
        assert x.tobytes() == y.tobytes(), f"{k}: values differ"


def tree_bit_exact(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            tree_bit_exact(a[k], b[k], f"{path}/{k}")
        return
    x, y = np.asarray(a), np.asarray(b)
    assert x.dtype == y.dtype and x.shape == y.shape, f"{path}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
    assert x.tobytes() == y.tobytes(), f"{path}: values differ"


def make_reference(path, *, fmt="safetensors", tie=False, dtype="float32", seed=1, vocab=96, hidden=64, layers=2,
                  heads=4, kv_heads=2, inter=112):
    """A reference-code style checkpoint: HF LLaMA config.json + state dict with model.query_embed [1,1,E]
    (the reference model's state_dict names), written with torch/safetensors directly."""
    import torch  # deferred: torch is optional

    model = make_hf_llama(path, tie=tie, dtype=dtype, seed=seed, vocab=vocab, hidden=hidden, layers=layers,
                          heads=heads, kv_heads=kv_heads, inter=inter)
    for f in os.listdir(path):
        if f.endswith((".safetensors", ".bin", ".json")) and f != "config.json":
            os.remove(os.path.join(path, f))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie:
        sd.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(seed)
    sd["model.query_embed"] = torch.randn(1, 1, hidden, generator=g).to(getattr(torch, dtype))
    if fmt == "bin":
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file  # deferred: torch is optional

        save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    return model, cfg, {k: v for k, v in sd.items()}


def safetensors_to_bin(path, shards=1):
    """Rewrites a HF directory's safetensors as PyTorch .bin (transformers 5 always writes safetensors;
    this is transformers 4's `safe_serialization=False` layout: pytorch_model.bin, or
    pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json)."""
    import torch  # deferred: torch is optional
    from safetensors.torch import load_file  # deferred: torch is optional

    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
            os.remove(os.path.join(path, f))
        elif f == "model.safetensors.index.json":
            os.remove(os.path.join(path, f))
    keys = list(sd)
    if shards == 1:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def make_checkpoint(path, layout, **kw):
    """make_hf_llama in one of the layouts: single/sharded x safetensors/bin."""
    sharded = layout.startswith("sharded")
    model = make_hf_llama(path, max_shard_size="20KB" if sharded else None, **kw)
    if layout.endswith("bin"):
        safetensors_to_bin(path, shards=3 if sharded else 1)
    return model
