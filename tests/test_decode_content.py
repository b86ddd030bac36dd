"""Base-model decoding (generate with DecodeSpec(stream="content")) on the tiny random model: greedy = the argmax of
the causal content-stream forward at every step, cached = uncached, ragged batch = rows alone, EOS,
sampling determinism, and the options that do not apply are refused."""
import numpy as np
import pytest

from a3jax.decode import DecodeError, DecodeSpec, SamplingParams, generate
from a3jax.model import forward
from test_decode_common import TINY, tiny

PROMPTS = [[60, 5, 9, 17], [60, 33], [60, 1, 2, 3, 4, 5, 6]]


def _greedy_by_forward(cfg, params, prompt, n):
    """Independent reference: re-run the full causal forward (no cache, no loop) for every new token."""
    seq = list(prompt)
    for _ in range(n):
        buf = np.full((1, 16), cfg.pad_token_id, np.int32)  # right padding: a causal row never sees it
        buf[0, :len(seq)] = seq
        logits = np.asarray(forward(cfg, params, buf, stream="content"))[0, len(seq) - 1]
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


@pytest.mark.slow
def test_greedy_equals_stepwise_argmax_cached_and_uncached_ragged():
    cfg, params = tiny()
    res = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False, stream="content"))
    new = res.new
    unc = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False, stream="content", use_cache=False)).new
    np.testing.assert_array_equal(new, unc)
    for r, p in enumerate(PROMPTS):
        assert new[r].tolist() == _greedy_by_forward(cfg, params, p, 8), r
        alone = generate(cfg, params, [p], 8, DecodeSpec(stop_at_eos=False, stream="content")).new
        np.testing.assert_array_equal(alone[0], new[r])
        # the buffer: prompt kept, new tokens right after it with their steps and log-probs
        assert res.tokens[r, :len(p)].tolist() == p
        assert res.step[r, len(p):len(p) + 8].tolist() == list(range(8))
        assert (res.logprobs[r, len(p):len(p) + 8] < 0).all() and (res.logprobs[r, :len(p)] == 0).all()
    assert res.num_steps == 8


def test_eos_stops_a_row_and_pads_after_it():
    cfg, params = tiny()
    full = generate(cfg, params, PROMPTS, 8, DecodeSpec(stop_at_eos=False, stream="content")).new
    stop = int(full[0, 2])  # make the third token of row 0 the stop token
    new = generate(cfg, params, PROMPTS, 8, DecodeSpec(eos_id=stop, stream="content")).new
    for r in range(len(PROMPTS)):
        hits = np.flatnonzero(full[r] == stop)
        if len(hits):
            k = hits[0]
            assert new[r, :k + 1].tolist() == full[r, :k + 1].tolist()
            assert (new[r, k + 1:] == TINY.pad_token_id).all()
        else:
            assert new[r].tolist() == full[r].tolist()


def test_sampling_is_deterministic_given_the_seed_and_options_are_checked():
    cfg, params = tiny()
    spec = DecodeSpec(stop_at_eos=False, stream="content")
    a = generate(cfg, params, PROMPTS, 6, spec, SamplingParams(temperature=1.0, seed=3)).new
    b = generate(cfg, params, PROMPTS, 6, spec, SamplingParams(temperature=1.0, seed=3)).new
    c = generate(cfg, params, PROMPTS, 6, spec, SamplingParams(temperature=1.0, seed=4)).new
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for kw, name in [({"order": "random"}, "order"), ({"group_size": 2}, "group_size"),
                     ({"threshold": 0.5, "order": "confidence"}, "threshold"),
                     ({"mode": "reference", "order": "confidence"}, "mode"),
                     ({"prompt_group_size": 2}, "prompt_group_size")]:
        with pytest.raises(DecodeError, match=f"{name}=.* does not apply"):
            generate(cfg, params, PROMPTS, 4, DecodeSpec(stream="content", **kw))
    with pytest.raises(DecodeError, match="stream must be one of"):
        generate(cfg, params, PROMPTS, 4, DecodeSpec(stream="both"))
    with pytest.raises(DecodeError, match="outside"):
        generate(cfg, params, [[60, 99]], 4, DecodeSpec(stream="content"))
