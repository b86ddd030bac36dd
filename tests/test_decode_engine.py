"""The decode surface: DecodeSpec / SamplingParams validation, the parameter budget of generate and
infill, the Engine (text in and out, batches, no recompiles within a bucket), an ar model's
not-adapted error, and the checkpoint's prompt layout as the decoding default."""
import dataclasses
import inspect

import numpy as np
import pytest

from a3jax.config import StageConfig, load_config
from a3jax.data.tokenizers import load_tokenizer
from a3jax.decode import DecodeError, DecodeSpec, Engine, SamplingParams, generate, infill
from a3jax.data.grouping import prompt_group_size_for
from a3jax.data.rows import text_row
from a3jax.decode.text import parse_masked
from a3jax.score import log_likelihood
from a3jax.objectives import ObjectiveError
from compile_helpers import counting_compiles
from test_decode_common import TINY_BYTE, batch, tiny


@pytest.mark.parametrize("kw,field", [
    (dict(order="sideways"), "DecodeSpec.order"),
    (dict(group_size=0), "DecodeSpec.group_size"),
    (dict(group_size=1.5), "DecodeSpec.group_size"),
    (dict(order="confidence", threshold=1.5), "DecodeSpec.threshold"),
    (dict(threshold=0.5), "DecodeSpec.threshold"),
    (dict(order="confidence", window=0), "DecodeSpec.window"),
    (dict(window=4), "DecodeSpec.window"),
    (dict(speculative=-1), "DecodeSpec.speculative"),
    (dict(order="confidence", speculative=2), "DecodeSpec.speculative"),
    (dict(prompt_group_size=-1), "DecodeSpec.prompt_group_size"),
    (dict(phases=0), "DecodeSpec.phases"),
    (dict(steps=0), "DecodeSpec.steps"),
    (dict(max_steps=-3), "DecodeSpec.max_steps"),
    (dict(eos_id="eos"), "DecodeSpec.eos_id"),
    (dict(stop_at_eos="yes"), "DecodeSpec.stop_at_eos"),
    (dict(use_cache=1), "DecodeSpec.use_cache"),
    (dict(teacher_forcing=None), "DecodeSpec.teacher_forcing"),
    (dict(stream="both"), "DecodeSpec.stream"),
    (dict(mode="official"), "DecodeSpec.mode"),
    (dict(speculative=2, teacher_forcing=True), "DecodeSpec.teacher_forcing"),
])
def test_decode_spec_names_the_bad_field_and_value(kw, field):
    with pytest.raises(DecodeError) as e:
        DecodeSpec(**kw)
    msg = str(e.value)
    assert msg.startswith(field), msg
    value = kw[field.split(".")[1]]
    assert repr(value) in msg or str(value) in msg, msg


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-1.0), "SamplingParams.temperature"),
    (dict(temperature="hot"), "SamplingParams.temperature"),
    (dict(top_k=-2), "SamplingParams.top_k"),
    (dict(top_p=0.0), "SamplingParams.top_p"),
    (dict(top_p=1.5), "SamplingParams.top_p"),
    (dict(seed=1.5), "SamplingParams.seed"),
    (dict(seed="7"), "SamplingParams.seed"),
    (dict(num_samples=0), "SamplingParams.num_samples"),
    (dict(independent_rows="no"), "SamplingParams.independent_rows"),
    (dict(seed=[1, 2], independent_rows=True), "SamplingParams.independent_rows"),
    (dict(num_samples=2, independent_rows=True), "SamplingParams.num_samples"),
])
def test_sampling_params_name_the_bad_field(kw, field):
    with pytest.raises(DecodeError, match=f"^{field}"):
        SamplingParams(**kw)


def test_specs_are_frozen_and_seeds_become_tuples():
    sp = SamplingParams(seed=np.array([3, 4]))
    assert sp.seed == (3, 4) and sp.per_row_seeds
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.temperature = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        DecodeSpec().order = "random"


def test_generate_and_infill_take_at_most_eight_parameters():
    for fn in (generate, infill):
        assert len(inspect.signature(fn).parameters) <= 8, fn.__name__


# ----------------------------------------------------------------------------- the Engine


@pytest.fixture(scope="module")
def engine():
    cfg, params = tiny(TINY_BYTE)
    return Engine(cfg, params, load_tokenizer("byte"), slots=4)


def test_engine_text_in_text_out(engine):
    tok = engine.tokenizer
    out = engine.generate(["Hello", "ab"], max_new_tokens=6, spec=DecodeSpec(stop_at_eos=False))
    assert [c.prompt for c in out] == ["Hello", "ab"]
    for c in out:
        assert len(c.tokens) == 6 and c.text == tok.decode([int(x) for x in c.tokens if x not in (tok.pad_id, tok.eos_id)])
        assert c.logprobs.shape == (6,) and (c.logprobs < 0).all() and c.steps == 6
    # the same tokens as the function on the same ids
    ids = [tok.bos_id] + list(tok.encode("Hello"))
    want = generate(engine.cfg, engine.params, [ids], 6, DecodeSpec(stop_at_eos=False)).new[0]
    np.testing.assert_array_equal(out[0].tokens, want)
    filled, = engine.infill("ab[MASK:3]cd", spec=DecodeSpec(order="confidence", group_size=1))
    assert filled.text.startswith("ab") and filled.text.endswith("cd") and len(filled.blanks) == 1
    assert filled.steps == 3 and (filled.logprobs[3:6] < 0).all() and (filled.logprobs[:3] == 0).all()
    assert filled.text == "ab" + filled.blanks[0] + "cd"
    scored = engine.score(["hello world", "abc"], grouping="random:4")
    assert [s.tokens for s in scored] == [11, 3] and all(s.log_likelihood < 0 for s in scored)


def test_engine_batched_equals_one_by_one(engine):
    prompts = ["Hello", "a", "The cat sat", "xyz", "0123456789", "q"]  # more prompts than slots
    sp = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    for spec in (DecodeSpec(stop_at_eos=False), DecodeSpec(order="confidence", group_size=2, stop_at_eos=False),
                 DecodeSpec(speculative=2, stop_at_eos=False)):
        many = engine.generate(prompts, 8, spec, sp)
        for p, c in zip(prompts, many):
            one, = engine.generate([p], 8, spec, sp)
            np.testing.assert_array_equal(one.tokens, c.tokens, err_msg=f"{spec} {p!r}")
            np.testing.assert_allclose(one.logprobs, c.logprobs, atol=1e-5)
    texts = ["ab[MASK:3]cd", "[MASK:2] x", "hello [MASK:4] world", "a[MASK:1]b", "zz[MASK:2]"]
    many = engine.infill(texts, spec=DecodeSpec(order="confidence", group_size=1))
    for t, f in zip(texts, many):
        one, = engine.infill(t, spec=DecodeSpec(order="confidence", group_size=1))
        assert one.text == f.text, t


def test_engine_second_call_in_the_same_bucket_compiles_nothing(engine):
    with counting_compiles() as compiles:
        spec = DecodeSpec(order="left_to_right", group_size=2, stop_at_eos=False)
        engine.generate(["Hello there", "ab"], 8, spec)
        first = len(compiles)
        assert first > 0  # the listener sees compiles
        engine.generate(["x", "A longer prompt", "mid"], 8, spec)  # other lengths, other batch size
        assert len(compiles) == first, f"{len(compiles) - first} new compiles"
        content = DecodeSpec(stream="content", stop_at_eos=False)
        engine.generate(["Hello there"], 8, content)
        first = len(compiles)
        engine.generate(["x", "A longer prompt"], 8, content)
        assert len(compiles) == first, f"content stream: {len(compiles) - first} new compiles"


def _unpadded_infill(engine, texts, spec):
    """The texts' rows in one plain infill call: [len(texts), longest row], no length bucket, no
    filler rows, shapes that follow the blanks."""
    parsed = [parse_masked(t, engine.tokenizer) for t in texts]
    t = max(len(ids) for ids, _, _ in parsed)
    tokens = np.zeros((len(texts), t), np.int64)
    known = np.zeros((len(texts), t), bool)
    valid = np.zeros((len(texts), t), bool)
    for r, (ids, k, _) in enumerate(parsed):
        tokens[r, :len(ids)], known[r, :len(ids)], valid[r, :len(ids)] = ids, k, True
    res = infill(engine.cfg, engine.params, tokens, known, spec, valid=valid)
    return [(res.tokens[r, :len(ids)], res.logprobs[r, :len(ids)]) for r, (ids, _, _) in enumerate(parsed)]


@pytest.mark.parametrize("spec", [DecodeSpec(order="left_to_right", group_size=3),
                                  DecodeSpec(order="confidence", group_size=3)], ids=["fixed", "dynamic"])
def test_engine_infill_compiles_nothing_new_within_a_bucket(engine, spec):
    """Other context lengths, blank counts and lengths and row counts in one length bucket reuse the
    first call's programs, and fill the same tokens as a plain call shaped to the rows."""
    first_texts = ["ab[MASK:3]cd", "hello [MASK:4] world"]
    other_texts = ["x[MASK:7]yz[MASK:2]q", "a[MASK:1]b", "zz[MASK:2]", "[MASK:5] tail", "0123[MASK:9]"]
    with counting_compiles() as compiles:
        first = engine.infill(first_texts, spec=spec)
        n = len(compiles)
        assert n > 0
        other = engine.infill(other_texts, spec=spec)  # five rows: two calls of four slots
        assert len(compiles) == n, f"{len(compiles) - n} new compiles"
    for texts, got in ((first_texts, first), (other_texts, other)):
        for text, f, (tokens, logprobs) in zip(texts, got, _unpadded_infill(engine, texts, spec)):
            np.testing.assert_array_equal(f.tokens, tokens, err_msg=text)
            np.testing.assert_allclose(f.logprobs, logprobs, atol=1e-5, err_msg=text)


def test_engine_infill_lays_a_user_order_over_its_buffer(engine):
    """A grouping given per position of the text (the buffer is a longer bucket) decodes as the plain
    call on the unpadded row; one of the wrong length is an error that says so."""
    text = "ab[MASK:5]cd"
    ids, known, _ = parse_masked(text, engine.tokenizer)
    order = np.zeros(len(ids), np.int64)
    order[~known] = [2, 0, 2, 1, 0]  # steps: {1, 4}, then {3}, then {0, 2}
    spec = DecodeSpec(order=order)
    got, = engine.infill(text, spec=spec)
    (tokens, logprobs), = _unpadded_infill(engine, [text], spec)
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.logprobs, logprobs, atol=1e-5)
    assert got.steps == 3
    with pytest.raises(ValueError, match=r"user grouping has shape \(3,\)"):
        infill(engine.cfg, engine.params, ids[None], known[None], DecodeSpec(order=np.array([0, 1, 2])))


def test_engine_score_runs_fixed_batches(engine):
    """Another number of texts and other lengths in one length bucket compile nothing new; each
    score is the exact log-likelihood of the text's own unpadded row."""
    with counting_compiles() as compiles:
        engine.score(["hello world", "abc"])
        n = len(compiles)
        texts = ["a", "The cat sat.", "xyz", "0123456789", "qq"]  # five texts: two batches of four
        got = engine.score(texts, grouping="random:4")
        assert len(compiles) == n, f"{len(compiles) - n} new compiles"
    for i, (text, s) in enumerate(zip(texts, got)):
        ids, groups, target = text_row(engine.tokenizer.bos_id, engine.tokenizer.encode(text), "random:4", 0, i)
        want = log_likelihood(engine.cfg, engine.params, ids[None], groups[None], target_mask=target[None])[0]
        assert s.tokens == len(ids) - 1
        # float32 sums of ~100 nats: a few ulps (7.6e-6 each at 100) apart with other batch shapes
        assert s.log_likelihood == pytest.approx(float(want), rel=1e-6, abs=1e-5), text


def test_engine_bad_input(engine):
    with pytest.raises(DecodeError, match="exceeds the longest bucket"):
        engine.generate(["x" * 300], 8)
    with pytest.raises(DecodeError, match="num_samples=8 exceeds the Engine's 4 slots"):
        engine.generate(["x"], 4, sampling=SamplingParams(temperature=1.0, num_samples=8))
    with pytest.raises(DecodeError, match="num_samples=8 exceeds the Engine's 4 slots"):
        engine.infill("a[MASK:2]", sampling=SamplingParams(temperature=1.0, num_samples=8))
    with pytest.raises(DecodeError, match="needs known="):
        engine.infill(np.array([256, 97, 98]))
    with pytest.raises(DecodeError, match="no tokenizer"):
        Engine(engine.cfg, engine.params).generate(["x"], 4)


def test_engine_load_reads_the_checkpoint_and_its_tokenizer(tmp_path, engine):
    from a3jax.checkpoint import save_params

    ckpt = save_params(str(tmp_path / "ck"), engine.cfg, engine.params)
    eng = Engine.load(ckpt, slots=4)
    assert eng.cfg == engine.cfg and type(eng.tokenizer).__name__ == "ByteTokenizer"
    a = eng.generate(["Hi"], 5, DecodeSpec(stop_at_eos=False))[0].tokens
    np.testing.assert_array_equal(a, engine.generate(["Hi"], 5, DecodeSpec(stop_at_eos=False))[0].tokens)


# ----------------------------------------------------------------------------- what a model can do


def test_an_ar_model_uses_its_content_stream_and_refuses_a3_operations():
    cfg, params = tiny(TINY_BYTE)
    ar = dataclasses.replace(cfg, objective="ar")
    eng = Engine(ar, params, load_tokenizer("byte"), slots=2)
    by_default = eng.generate(["Hello"], 6, DecodeSpec(stop_at_eos=False))[0].tokens
    content = Engine(cfg, params, load_tokenizer("byte"), slots=2).generate(
        ["Hello"], 6, DecodeSpec(stream="content", stop_at_eos=False))[0].tokens
    np.testing.assert_array_equal(by_default, content)
    hint = r"not been A3-adapted.*a3jax train CONFIG.yaml model.init_from=CKPT.*A3 curriculum"
    with pytest.raises(ObjectiveError, match=hint):
        eng.infill("ab[MASK:2]cd")
    with pytest.raises(ObjectiveError, match=hint):
        eng.generate(["Hello"], 4, DecodeSpec(stream="query"))
    with pytest.raises(ObjectiveError, match=hint):
        eng.score(["hello"], grouping="random:4")
    assert eng.score(["hello"])[0].log_likelihood < 0  # left to right is what it can score


def test_the_checkpoint_layout_is_the_default():
    """A model config recording prompt_group_size decodes its context in that layout by default:
    the same as asking for it, and not the one-group layout."""
    cfg, params = tiny()
    tokens, known = batch(seed=9)
    known[:, :8] = True  # a longer context, so its layout matters
    chunked = dataclasses.replace(cfg, prompt_group_size=1)
    spec = DecodeSpec(order="confidence", group_size=1)
    default = infill(chunked, params, tokens, known, spec)
    explicit = infill(cfg, params, tokens, known, dataclasses.replace(spec, prompt_group_size=1))
    one_group = infill(chunked, params, tokens, known, dataclasses.replace(spec, prompt_group_size=0))
    np.testing.assert_array_equal(default.tokens, explicit.tokens)
    np.testing.assert_allclose(default.logprobs, explicit.logprobs, atol=1e-6)
    assert (default.logprobs != one_group.logprobs).any()
    prompts = [[60, 1, 2, 3, 4, 5, 6], [60, 9, 8, 7]]
    g_default = generate(chunked, params, prompts, 6, DecodeSpec(stop_at_eos=False))
    g_explicit = generate(cfg, params, prompts, 6, DecodeSpec(stop_at_eos=False, prompt_group_size=1))
    np.testing.assert_allclose(g_default.logprobs, g_explicit.logprobs, atol=1e-6)
    np.testing.assert_array_equal(g_default.new, g_explicit.new)


def test_prompt_group_size_follows_the_last_trained_stage():
    def cfg_with(stages, steps=0, objective="a3"):
        return load_config(None, [f"data.stages={stages}", f"train.steps={steps}", f"train.objective={objective}"])

    assert prompt_group_size_for(cfg_with("[{random:4: 10}, {infill:0.25:8:1:ltr: 10}]")) == 1
    assert prompt_group_size_for(cfg_with("[{ar: 10}, {blocks:4: 10}]")) == 4
    assert prompt_group_size_for(cfg_with("[{ar: 10}, {random:4: 10}]")) == 0
    assert prompt_group_size_for(cfg_with("[{random:4: 10}, {infill: 10}]", steps=10)) == 0  # stops before infill
    assert prompt_group_size_for(cfg_with("[{ar: 10}]", objective="ar")) == 0
    demo = load_config("configs/demo/adapt.yaml")
    assert demo.data.stages[-1].strategy.startswith("infill") and prompt_group_size_for(demo) == 1
    assert isinstance(demo.data.stages[-1], StageConfig)
