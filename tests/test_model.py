"""The two-stream model: HF parity, the visibility rule's consequences, layouts, kernels, sharding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import a3jax.model as m
from a3jax import masks
from a3jax import sharding as sh
from a3jax.config import ConfigError, MeshConfig, ModelConfig
from a3jax.convert import from_hf
from a3jax.model import (A3Transformer, InputError, apply_model, decay_mask, dtype_of, forward, init_params,
                         numpy_dtype, param_axes, param_shapes, param_specs, query_embed_init, shard_params,
                         validate_inputs)
from a3jax.model.params import embed_mean
from hf_models import hf_logits, make_hf_llama

SMALL = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=128, attention="dense", attention_block_size=8)


@pytest.fixture(scope="module")
def params():
    p = jax.jit(init_params, static_argnums=0)(SMALL, jax.random.PRNGKey(0))  # jitted: eager init is slow
    # Random norm scales and query vector so no symmetry hides a bug.
    rng = np.random.default_rng(1)
    p = jax.tree.map(np.asarray, p)
    p["layers"]["attn_norm"] = 1 + 0.2 * rng.standard_normal(p["layers"]["attn_norm"].shape).astype(np.float32)
    p["query_embed"] = rng.standard_normal(p["query_embed"].shape).astype(np.float32) * 0.1
    return p


# ----------------------------------------------------------------------------- 1. HF parity

@pytest.mark.slow
@pytest.mark.needs_torch
@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie=True),
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, kv_heads=1),
])
def test_content_stream_matches_hf_llama(tmp_path, kw):
    model = make_hf_llama(tmp_path, **kw)
    cfg, p = from_hf(str(tmp_path))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48))
    ours = np.asarray(forward(cfg, p, tokens, stream="content"))
    theirs = hf_logits(model, tokens)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


# ----------------------------------------------------------------------------- random layouts

@st.composite
def layouts(draw, max_t=24):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(2, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, SMALL.vocab_size, (b, t))
    groups = rng.integers(0, draw(st.integers(1, t)), (b, t))  # ties and any order
    nseg = draw(st.integers(1, 3))
    segs = rng.integers(0, nseg + 1, (b, t))  # includes padding (0) anywhere
    positions = np.stack([rng.permutation(t) for _ in range(b)])
    return tokens, positions, groups, segs, rng


@pytest.mark.slow
@given(layouts())
@settings(max_examples=20)
def test_query_logits_ignore_invisible_tokens(params, layout):
    tokens, positions, groups, segs, rng = layout
    base = np.asarray(forward(SMALL, params, tokens, positions, groups, segs))
    b, t = tokens.shape
    i = (rng.integers(b), rng.integers(t))
    row = i[0]
    hidden = (groups[row] >= groups[i]) | (segs[row] != segs[i])
    hidden[i[1]] = True  # the query never sees its own token
    changed = tokens.copy()
    changed[row, hidden] = (changed[row, hidden] + 1 + rng.integers(0, SMALL.vocab_size - 1, hidden.sum())) % SMALL.vocab_size
    out = np.asarray(forward(SMALL, params, changed, positions, groups, segs))
    if segs[i] != 0:
        np.testing.assert_allclose(out[i], base[i], atol=1e-5)
    # And a visible token does matter (the rule is not vacuous): change one visible token.
    vis = ~hidden & (segs[row] != 0)
    if segs[i] != 0 and vis.any():
        j = np.flatnonzero(vis)[0]
        changed2 = tokens.copy()
        changed2[row, j] = (changed2[row, j] + 7) % SMALL.vocab_size
        out2 = np.asarray(forward(SMALL, params, changed2, positions, groups, segs))
        assert np.abs(out2[i] - base[i]).max() > 1e-6


@pytest.mark.slow
@given(layouts())
@settings(max_examples=15)
def test_content_logits_ignore_later_groups(params, layout):
    tokens, positions, groups, segs, rng = layout
    base = np.asarray(forward(SMALL, params, tokens, positions, groups, segs, stream="content"))
    b, t = tokens.shape
    i = (rng.integers(b), rng.integers(t))
    row = i[0]
    later = (groups[row] > groups[i]) | (segs[row] != segs[i])
    changed = tokens.copy()
    changed[row, later] = (changed[row, later] + 3) % SMALL.vocab_size
    out = np.asarray(forward(SMALL, params, changed, positions, groups, segs, stream="content"))
    if segs[i] != 0:
        np.testing.assert_allclose(out[i], base[i], atol=1e-5)


@pytest.mark.slow
@given(layouts())
@settings(max_examples=15)
def test_permuting_rows_permutes_logits(params, layout):
    tokens, positions, groups, segs, rng = layout
    t = tokens.shape[1]
    perm = rng.permutation(t)
    base = np.asarray(forward(SMALL, params, tokens, positions, groups, segs))
    out = np.asarray(forward(SMALL, params, tokens[:, perm], positions[:, perm], groups[:, perm], segs[:, perm]))
    real = segs[:, perm] != 0
    np.testing.assert_allclose(out[real], base[:, perm][real], atol=1e-5)


def test_ar_query_logits_equal_prefix_only(params):
    tokens = np.random.default_rng(3).integers(0, SMALL.vocab_size, (1, 20))
    full = np.asarray(forward(SMALL, params, tokens))  # groups = positions: left-to-right AR
    for i in (0, 1, 7, 19):
        # Row i's prediction from the prefix alone: append a dummy token at i, score only row i.
        prefix = np.concatenate([tokens[:, :i], np.zeros((1, 1), np.int64)], axis=1)
        alone = np.asarray(forward(SMALL, params, prefix))
        np.testing.assert_allclose(full[0, i], alone[0, i], atol=1e-5)


def test_first_group_sees_nothing_and_equals_query_vector_prediction(params):
    tokens = np.random.default_rng(4).integers(0, SMALL.vocab_size, (1, 10))
    groups = np.array([[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]])
    out = np.asarray(forward(SMALL, params, tokens, groups=groups))
    # Both first-group query rows see no key, so their attention output is zero in every layer: they
    # are a function of query_embed alone. RoPE only rotates q and k, so their position does not enter
    # either: both rows have the same logits, and changing every token leaves them unchanged.
    np.testing.assert_allclose(out[0, 0], out[0, 1], atol=1e-6)
    other = np.asarray(forward(SMALL, params, (tokens + 5) % SMALL.vocab_size, groups=groups))
    np.testing.assert_allclose(out[0, :2], other[0, :2], atol=1e-6)
    assert np.abs(out[0, 2:] - other[0, 2:]).max() > 1e-4


# ----------------------------------------------------------------------------- kernels and layouts

def _sorted_layout(rng, b, t, nseg=2, group_size=3):
    tokens = rng.integers(0, SMALL.vocab_size, (b, t))
    segs = np.sort(rng.integers(1, nseg + 1, (b, t)), axis=1)
    segs[:, -3:] = 0  # padding tail
    groups = np.zeros((b, t), np.int64)
    positions = np.zeros((b, t), np.int64)
    for r in range(b):
        for s in np.unique(segs[r]):
            idx = np.flatnonzero(segs[r] == s)
            positions[r, idx] = rng.permutation(len(idx))
            groups[r, idx] = np.arange(len(idx)) // group_size + (0 if s == 0 else 1000 * s)
    return tokens, positions, groups, segs


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["query", "content"])
def test_dense_equals_blockwise_forward_and_grad(params, stream):
    rng = np.random.default_rng(5)
    tokens, positions, groups, segs = _sorted_layout(rng, 2, 45)
    blk = dataclasses.replace(SMALL, attention="blockwise")
    a = np.asarray(forward(SMALL, params, tokens, positions, groups, segs, stream=stream))
    b = np.asarray(forward(blk, params, tokens, positions, groups, segs, stream=stream))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # Unsorted rows too: blockwise must stay exact (it only skips less).
    perm = rng.permutation(45)
    args = (tokens[:, perm], positions[:, perm], groups[:, perm], segs[:, perm])
    np.testing.assert_allclose(np.asarray(forward(SMALL, params, *args, stream=stream)),
                               np.asarray(forward(blk, params, *args, stream=stream)), atol=1e-5)

    def loss(p, cfg):
        lg = apply_model(cfg, p, *(jnp.asarray(x) for x in (tokens, positions, groups, segs)), stream)
        return jnp.mean(jax.nn.log_softmax(lg)[..., 3])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile: eager blockwise grads are slow
    ga, gb = grad(params, SMALL), grad(params, blk)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_block_ranges_skip_hidden_blocks_on_sorted_layout():
    t, blk = 64, 8
    g = jnp.arange(t)[None]
    s = jnp.ones((1, t), jnp.int32)
    lo, hi = masks.block_ranges(masks.stream_groups(g, "query"), s, g, s, blk, blk)
    # Causal-like layout: query block i needs key blocks [0, i] (strict rule: block 0 needs [0, 1)).
    np.testing.assert_array_equal(np.asarray(lo), 0)
    np.testing.assert_array_equal(np.asarray(hi), np.arange(1, t // blk + 1))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(scan_layers=True), dict(remat="full"), dict(remat="dots"),
                                     dict(scan_layers=True, remat="dots_no_batch")])
def test_scan_and_remat_match_unrolled(params, variant):
    rng = np.random.default_rng(6)
    tokens, positions, groups, segs = _sorted_layout(rng, 2, 30)
    other = dataclasses.replace(SMALL, **variant)
    for stream in ("query", "content"):
        np.testing.assert_allclose(np.asarray(forward(SMALL, params, tokens, positions, groups, segs, stream=stream)),
                                   np.asarray(forward(other, params, tokens, positions, groups, segs, stream=stream)),
                                   atol=1e-5)

    def loss(p, cfg):
        return jnp.mean(apply_model(cfg, p, *(jnp.asarray(x) for x in (tokens, positions, groups, segs))) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile: eager grads compile every op
    for x, y in zip(jax.tree.leaves(grad(params, SMALL)), jax.tree.leaves(grad(params, other))):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_bf16_close_to_fp32(params):
    tokens, positions, groups, segs = _sorted_layout(np.random.default_rng(7), 2, 32)
    bf = dataclasses.replace(SMALL, dtype="bfloat16")
    a = np.asarray(forward(SMALL, params, tokens, positions, groups, segs))
    b = np.asarray(forward(bf, params, tokens, positions, groups, segs))
    assert b.dtype == np.float32
    # bf16 has an 8-bit mantissa: logits of a 2-layer model agree to a few 1e-2 and in ranking.
    assert np.abs(a - b).max() < 5e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_reference_block_differs_and_llama_block_is_default(params):
    tokens = np.random.default_rng(8).integers(0, SMALL.vocab_size, (1, 12))
    off = dataclasses.replace(SMALL, block="reference")
    a = np.asarray(forward(SMALL, params, tokens, stream="content"))
    b = np.asarray(forward(off, params, tokens, stream="content"))
    assert SMALL.block == "llama" and np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------- sharding

@pytest.mark.slow
def test_sharded_forward_on_2x4_mesh_equals_single_device(params):
    assert jax.device_count() == 8
    cfg = dataclasses.replace(SMALL, num_kv_heads=4, hidden_size=64, intermediate_size=128)
    p = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(1))
    tokens, positions, groups, segs = _sorted_layout(np.random.default_rng(9), 4, 32)
    ref = np.asarray(forward(cfg, p, tokens, positions, groups, segs))
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = sh.rules_of(MeshConfig())
    ps = shard_params(p, cfg, mesh, rules)
    assert ps["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    put = lambda x: jax.device_put(jnp.asarray(x, jnp.int32), sh.batch_sharding(mesh, rules))
    with sh.activate(mesh, rules):
        out = forward(cfg, ps, put(tokens), put(positions), put(groups), put(segs))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_mesh_mismatch_is_a_clear_error():
    with pytest.raises(ConfigError, match="3\\*1\\*1 = 3 but there are 8 devices"):
        sh.make_mesh(MeshConfig(data=3, fsdp=1, tensor=1))
    with pytest.raises(ConfigError, match="cannot be split"):
        sh.make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1))


# ----------------------------------------------------------------------------- bad input

def test_bad_input_raises_before_compiling(params, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compiled despite bad input")

    monkeypatch.setattr(m, "_forward_jit", boom)
    tok = np.zeros((1, 8), np.int32)
    with pytest.raises(InputError, match="token id 64 is outside"):
        forward(SMALL, params, tok + 64)
    with pytest.raises(InputError, match="token id -1"):
        forward(SMALL, params, tok - 1)
    with pytest.raises(InputError, match="groups has shape \\(1, 7\\)"):
        forward(SMALL, params, tok, groups=np.zeros((1, 7), np.int32))
    with pytest.raises(InputError, match="segment_ids has shape"):
        forward(SMALL, params, tok, segment_ids=np.ones((2, 8), np.int32))
    with pytest.raises(InputError, match="position 500 is outside"):
        forward(SMALL, params, tok, positions=np.full((1, 8), 500))
    with pytest.raises(InputError, match="length 200 exceeds"):
        forward(SMALL, params, np.zeros((1, 200), np.int32))
    with pytest.raises(InputError, match="stream must be"):
        forward(SMALL, params, tok, stream="both")
    with pytest.raises(InputError, match="tokens must be \\[batch, length\\]"):
        forward(SMALL, params, np.zeros(8, np.int32))


def test_bad_position_names_the_one_out_of_range():
    cfg = dataclasses.replace(SMALL, max_position_embeddings=8)
    tok = np.zeros((1, 2), np.int32)
    with pytest.raises(InputError, match="position -1 is outside"):  # 5 is in range
        validate_inputs(cfg, tok, positions=np.array([[-1, 5]]))
    with pytest.raises(InputError, match="position 9 is outside"):
        validate_inputs(cfg, tok, positions=np.array([[3, 9]]))
    with pytest.raises(InputError, match="position (-2|9) is outside"):
        validate_inputs(cfg, tok, positions=np.array([[-2, 9]]))
    validate_inputs(cfg, tok, positions=np.array([[0, 7]]))


# ----------------------------------------------------------------------------- the param table

@pytest.mark.parametrize("kw", [dict(), dict(tie_word_embeddings=True, param_dtype="bfloat16")])
def test_module_declares_exactly_the_param_table(kw):
    cfg = dataclasses.replace(SMALL, **kw)
    dummy = jnp.zeros((1, 4), jnp.int32)
    boxed = jax.eval_shape(lambda r: A3Transformer(cfg).init(r, dummy, dummy, dummy, dummy + 1), jax.random.PRNGKey(0))
    declared = boxed["params"]
    is_shape = lambda x: isinstance(x, tuple)
    assert jax.tree.map(lambda a: a.shape, nn.meta.unbox(declared)) == param_shapes(cfg)
    assert all(a.dtype == dtype_of(cfg.param_dtype) for a in jax.tree.leaves(nn.meta.unbox(declared)))
    names = jax.tree.map(lambda b: b.names, declared, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert names == param_axes(cfg)
    assert ("lm_head" in param_shapes(cfg)) == (not cfg.tie_word_embeddings)
    for spec, shape in zip(jax.tree.leaves(param_specs(cfg)), jax.tree.leaves(param_shapes(cfg), is_leaf=is_shape)):
        assert len(spec.axes) == len(shape) == len(spec.shape)


def test_decay_mask_comes_from_the_table():
    mask = decay_mask(jax.tree.map(np.zeros, param_shapes(SMALL), is_leaf=lambda x: isinstance(x, tuple)))
    assert mask == jax.tree.map(lambda s: s.decay, param_specs(SMALL))
    assert mask["layers"]["wq"] and not mask["layers"]["attn_norm"] and not mask["query_embed"]
    with pytest.raises(KeyError, match="not in the param table"):
        decay_mask({"layers": {"extra_norm": np.zeros(3)}})


@pytest.mark.parametrize("query_init", ["embed_mean", "normal", "zeros"])
def test_query_embed_init_same_on_host_and_device(query_init):
    cfg = dataclasses.replace(SMALL, query_init=query_init)
    embed = np.random.default_rng(0).standard_normal((SMALL.vocab_size, SMALL.hidden_size)).astype(np.float32)
    host = query_embed_init(cfg, embed)
    dev = query_embed_init(cfg, jnp.asarray(embed), jax.random.PRNGKey(0))
    assert isinstance(host, np.ndarray) and host.shape == (SMALL.hidden_size,) and host.dtype == np.float32
    np.testing.assert_allclose(host, np.asarray(dev), atol=1e-6)
    bf16 = query_embed_init(cfg, embed.astype(numpy_dtype("bfloat16")))
    assert isinstance(bf16, np.ndarray) and bf16.dtype == np.dtype(jnp.bfloat16)


def test_embed_mean_chunks_match_the_full_mean():
    embed = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32)
    np.testing.assert_allclose(embed_mean(embed, chunk=7), embed.astype(np.float64).mean(0), atol=1e-6)
    np.testing.assert_allclose(np.asarray(embed_mean(jnp.asarray(embed))), embed.mean(0), atol=1e-6)


def test_param_count_matches_published_and_hand_counts():
    from a3jax.model import param_count

    # SmolLM2-135M (LLaMA architecture, tied embeddings) has 134,515,008 params; A3 adds the query vector.
    smol = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                       num_kv_heads=3, tie_word_embeddings=True)
    assert param_count(smol) == 134_515_008 + 576
    # By hand: embed 64*32, query 32, final norm 32, lm_head 32*64, and per layer two norms (2*32),
    # q and o (2*32*32), k and v (2*32*16), gate, up and down (3*32*64).
    small = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    assert param_count(small) == 2048 + 32 + 32 + 2048 + 2 * (64 + 2048 + 1024 + 6144)


# ----------------------------------------------------------------------------- the fused row stack

def _per_layer_reference(cfg, p, tokens, positions, groups, segs):
    """The two streams kept apart and every step done per layer and per stream (content and query rows
    normed, projected and concatenated in each layer, query rows from a broadcast query_embed, every
    layer's content update run): what run_rows' fused residual, hoisted row ids and once-computed
    first-layer query projection must equal. Query-stream logits."""
    from a3jax.model.attention import dense_attention
    from a3jax.model.layers import apply_rope, rms_norm, rope_cos_sin, swiglu_mlp
    eps = cfg.rms_norm_eps
    xc = p["embed"][tokens]
    xq = jnp.broadcast_to(p["query_embed"], xc.shape)
    cs = rope_cos_sin(cfg, positions)
    gc, gq = masks.stream_groups(groups, masks.CONTENT), masks.stream_groups(groups, masks.QUERY)
    for l in range(cfg.num_layers):
        w = jax.tree.map(lambda a: a[l], p["layers"])
        hc, hq = rms_norm(xc, w["attn_norm"], eps), rms_norm(xq, w["attn_norm"], eps)
        k = apply_rope(jnp.einsum("bte,ehd->bthd", hc, w["wk"]), *cs)
        v = jnp.einsum("bte,ehd->bthd", hc, w["wv"])
        new = []
        for x, h, g in ((xc, hc, gc), (xq, hq, gq)):
            q = apply_rope(jnp.einsum("bte,ehd->bthd", h, w["wq"]), *cs)
            a = jnp.einsum("bthd,hde->bte", dense_attention(q, k, v, g, segs, groups, segs), w["wo"])
            x = x + a
            new.append(x + swiglu_mlp(rms_norm(x, w["mlp_norm"], eps), w["w_gate"], w["w_up"], w["w_down"]))
        xc, xq = new
    h = rms_norm(xq, p["final_norm"], eps)
    return jnp.einsum("bte,ev->btv", h, p["lm_head"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [dict(), dict(num_layers=1), dict(num_layers=3, scan_layers=True),
                                     dict(num_layers=3, attention="blockwise"), dict(remat="full")])
def test_fused_rows_equal_per_layer_reference_forward_and_grad(variant):
    cfg = dataclasses.replace(SMALL, **variant)
    rng = np.random.default_rng(11)
    # everything jitted: one compile each, where eager calls compile every op
    p = jax.tree.map(np.asarray, jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(3)))
    p["query_embed"] = rng.standard_normal(p["query_embed"].shape).astype(np.float32)
    p["layers"]["attn_norm"] = 1 + 0.3 * rng.standard_normal(p["layers"]["attn_norm"].shape).astype(np.float32)
    tokens, positions, groups, segs = (jnp.asarray(a) for a in _sorted_layout(rng, 2, 30))
    ours_fn = jax.jit(lambda q: apply_model(cfg, q, tokens, positions, groups, segs, "query"))
    ref_fn = jax.jit(lambda q: _per_layer_reference(cfg, q, tokens, positions, groups, segs))
    np.testing.assert_allclose(np.asarray(ours_fn(p)), np.asarray(ref_fn(p)), atol=1e-5)
    tgt = jax.nn.one_hot(tokens, cfg.vocab_size)

    def loss(p, f):
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(f(p)) * tgt, -1))

    ga = jax.jit(jax.grad(lambda q: loss(q, ours_fn)))(p)
    gb = jax.jit(jax.grad(lambda q: loss(q, ref_fn)))(p)
    assert float(jnp.abs(gb["query_embed"]).max()) > 1e-4  # the hoisted projection's gradient is live
    for path, x in jax.tree_util.tree_leaves_with_path(ga):
        y = gb
        for k in path:
            y = y[k.key]
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
