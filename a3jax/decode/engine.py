"""`Engine`: a model (cfg, params, tokenizer) ready to generate, infill and score text or ids in
batches, the way MaxText's maxengine and gemma's sampler wrap a model.

    eng = Engine.load("runs/x/final")                 # or Engine(cfg, params, tokenizer)
    out = eng.generate(["def fib(n):"], max_new_tokens=64, sampling=SamplingParams(temperature=0.8))
    out = eng.infill("def add(a, b):\\n    [MASK:12]\\n", spec=DecodeSpec(order="confidence"))
    lp = eng.score(texts, grouping="random:4")

Fixed shapes. Every decode call runs the same rows: slots // num_samples requests (then filler
rows), each expanded to its num_samples samples, in a buffer whose length is the smallest of
`buckets` that holds it. The compiled programs (the jitted loops of a3jax.decode, cached by shape) are
reused across calls whose batch sizes, prompt or context lengths and blank counts differ within one
bucket: infill lays its rows out with fixed shapes (a3jax.decode.api.infill), and score runs batches
of `slots` rows padded to a length bucket (a3jax.score.score_rows). A server keeps requests in these
slots. Rows decode independently (greedy, or sampled with one seed: a row's draws do not depend on
its batch), so filler rows change nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from a3jax.checkpoint import load_params
from a3jax.config import ModelConfig
from a3jax.decode import api, text as text_lib
from a3jax.decode.spec import DecodeError, DecodeSpec, SamplingParams, pad_token, stop_token
from a3jax.score import score_texts


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation: text (None without a tokenizer), tokens (the new ids up to and
    including a stopping EOS), logprobs (log p of each of those tokens), steps (decoding steps, or
    model passes when speculative, of the batch that produced it), sample (index among num_samples)."""
    prompt: object
    text: Optional[str]
    tokens: np.ndarray
    logprobs: np.ndarray
    steps: int
    sample: int = 0


@dataclasses.dataclass(frozen=True)
class Infilled:
    """One filled row: text (None without a tokenizer), blanks (each blank's text; None without spans),
    tokens [T] and logprobs [T] (0 at known positions), steps of its batch."""
    text: Optional[str]
    blanks: Optional[list]
    tokens: np.ndarray
    logprobs: np.ndarray
    steps: int


@dataclasses.dataclass(frozen=True)
class Scored:
    """Exact log-likelihood of one text (BOS conditioned on, every text token scored)."""
    text: str
    tokens: int
    log_likelihood: float
    nll_per_token: float
    ppl: float
    bits_per_byte: float


def default_buckets(max_len: int) -> tuple:
    """Powers of two from 32, then max_len itself."""
    out, b = [], 32
    while b < max_len:
        out.append(b)
        b *= 2
    return tuple(out) + (max_len,)


class Engine:
    """cfg, params and a tokenizer (a3jax.data.tokenizers; None = ids only). slots: rows per decode
    call; buckets: the buffer lengths (default powers of two up to max_position_embeddings)."""

    def __init__(self, cfg: ModelConfig, params, tokenizer=None, *, slots: int = 4,
                 buckets: Optional[Sequence[int]] = None):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise DecodeError(f"Engine slots must be a positive int (rows per decode call), got {slots!r}")
        self.cfg, self.params, self.tokenizer, self.slots = cfg, params, tokenizer, slots
        self.buckets = tuple(sorted(buckets)) if buckets else default_buckets(cfg.max_position_embeddings)
        if self.buckets[-1] > cfg.max_position_embeddings:
            raise DecodeError(f"Engine bucket {self.buckets[-1]} exceeds max_position_embeddings="
                              f"{cfg.max_position_embeddings}")

    @classmethod
    def load(cls, path: str, tokenizer: str = "auto", **kw) -> "Engine":
        """From a params checkpoint or a run directory; tokenizer 'auto' = the checkpoint's own
        (a3jax.checkpoint.tokenizer_spec), or 'byte' / a path."""
        cfg, params = load_params(path)
        return cls(cfg, params, text_lib.load_tok(tokenizer, path), **kw)

    # ------------------------------------------------------------------ shapes

    def bucket(self, n: int) -> int:
        """The buffer length for n positions."""
        for b in self.buckets:
            if b >= n:
                return b
        raise DecodeError(f"a row of {n} positions exceeds the longest bucket {self.buckets[-1]} "
                          f"(max_position_embeddings={self.cfg.max_position_embeddings})")

    def _chunks(self, n: int, sp: SamplingParams):
        """(requests per call, [(first, end)] of each call's requests): a request takes num_samples
        slots, so a call holds slots // num_samples of them."""
        if sp.num_samples > self.slots:
            raise DecodeError(f"SamplingParams.num_samples={sp.num_samples} exceeds the Engine's {self.slots} slots")
        per = self.slots // sp.num_samples
        return per, [(a, min(a + per, n)) for a in range(0, n, per)]

    def _text(self, ids) -> str:
        """The text of generated ids, the tokenizer's pad and EOS left out."""
        return text_lib.completion_text(self._tok(), ids)

    def _tok(self):
        if self.tokenizer is None:
            raise DecodeError("this Engine has no tokenizer: pass token ids, or build it with one")
        return self.tokenizer

    # ------------------------------------------------------------------ generate

    def generate(self, prompts, max_new_tokens: int = 64, spec: Optional[DecodeSpec] = None,
                 sampling: Optional[SamplingParams] = None) -> list:
        """Continues each prompt (a str, a list of str, or token ids: a list of id lists / an array)
        by up to max_new_tokens tokens. Returns one Completion per prompt (per sample with
        num_samples: prompt i's samples at i*n .. i*n+n-1)."""
        spec, sp = spec or DecodeSpec(), sampling or SamplingParams()
        decoder = api.resolve_decoder(self.cfg, spec, sp, "generation")
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if texts and isinstance(texts[0], str):
            tok = self._tok()
            seqs = [text_lib.prompt_ids(tok, p, decoder == "content") for p in texts]
        else:
            seqs, texts = [list(np.asarray(s).reshape(-1)) for s in texts], [None] * len(texts)
        n = sp.num_samples
        filler = [self.cfg.bos_token_id if self.cfg.bos_token_id >= 0 else 0]
        out = []
        per, chunks = self._chunks(len(seqs), sp)
        for a, b in chunks:
            rows = seqs[a:b] + [filler] * (per - (b - a))
            seed = _chunk_seeds(sp, a, b, len(rows))
            t = self.bucket(max(len(s) for s in rows) + max_new_tokens)
            res = api.generate(self.cfg, self.params, rows, max_new_tokens, _lay_order(spec, a, b, per, t),
                               dataclasses.replace(sp, seed=seed), buffer_length=t)
            for r in range((b - a) * n):
                i = a + r // n
                new = res.new[r]
                end = _stop(new, self.cfg, spec)
                pos = len(seqs[i]) + np.arange(end)
                toks = new[:end]
                text = self._text(toks) if texts[i] is not None else None
                out.append(Completion(texts[i], text, toks, res.logprobs[r, pos], res.num_steps, r % n))
        return out

    # ------------------------------------------------------------------ infill

    def infill(self, texts, known=None, spec: Optional[DecodeSpec] = None,
               sampling: Optional[SamplingParams] = None) -> list:
        """Fills blanks: texts with [MASK:n] blanks (a str or a list of str), or token ids [B, T] / [T]
        with known [B, T] (True = context). Returns one Infilled per row."""
        spec, sp = spec or DecodeSpec(), sampling or SamplingParams()
        if isinstance(texts, str) or (isinstance(texts, (list, tuple)) and texts and isinstance(texts[0], str)):
            if known is not None:
                raise DecodeError("known= goes with token ids; a text marks its blanks as [MASK:n]")
            tok = self._tok()
            texts = [texts] if isinstance(texts, str) else list(texts)
            parsed = [text_lib.parse_masked(t, tok) for t in texts]
            rows = [(ids, k) for ids, k, _ in parsed]
            spans = [s for _, _, s in parsed]
        else:
            if known is None:
                raise DecodeError("infill on token ids needs known= (True = context, False = fill)")
            ids = np.asarray(texts).reshape((-1, np.shape(texts)[-1]))
            kn = np.asarray(known, bool).reshape(ids.shape)
            rows, spans = list(zip(ids, kn)), [None] * len(ids)
        pad = pad_token(self.cfg)
        filler = (np.array([max(self.cfg.bos_token_id, 0), pad]), np.array([True, False]))
        out = []
        per, chunks = self._chunks(len(rows), sp)
        for a, b in chunks:
            chunk = rows[a:b] + [filler] * (per - (b - a))
            t = self.bucket(max(len(r[0]) for r in chunk))
            tokens = np.full((len(chunk), t), pad, np.int64)
            kn = np.zeros((len(chunk), t), bool)
            valid = np.zeros((len(chunk), t), bool)
            for j, (ids, k) in enumerate(chunk):
                tokens[j, :len(ids)], kn[j, :len(ids)], valid[j, :len(ids)] = ids, k, True
            seed = _chunk_seeds(sp, a, b, len(chunk))
            res = api.infill(self.cfg, self.params, tokens, kn, _lay_order(spec, a, b, per, t),
                             dataclasses.replace(sp, seed=seed), valid, fixed_shapes=True)
            for r in range((b - a) * sp.num_samples):
                i = a + r // sp.num_samples
                n_i = len(rows[i][0])
                ids = res.tokens[r, :n_i]
                text = blanks = None
                if spans[i] is not None:
                    text = text_lib.render(self.tokenizer, ids, spans[i])
                    blanks = [self.tokenizer.decode(list(map(int, ids[x:y]))) for x, y in spans[i]]
                out.append(Infilled(text, blanks, ids, res.logprobs[r, :n_i], res.num_steps))
        return out

    # ------------------------------------------------------------------ score

    def score(self, texts, grouping: str = "ar", seed: int = 0, stream: str = "query") -> list:
        """Exact log P of each text (a str or a list of str) under a grouping strategy
        (a3jax.data.grouping: ar, blocks:k, random:k, ...), in batches of `slots` rows. stream
        'content': the causal content stream (the base LLaMA before adaptation; grouping 'ar' only).
        Returns one Scored per text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if api.model_decoder(self.cfg) == "content" and grouping != "ar":
            raise api.not_adapted(f"scoring under the grouping {grouping!r}")
        rows = score_texts(self.cfg, self.params, self._tok(), texts, grouping, seed, batch_size=self.slots,
                           stream=stream)
        return [Scored(t, r["tokens"], r["log_likelihood"], r["nll_per_token"], r["ppl"], r["bits_per_byte"])
                for t, r in zip(texts, rows)]


def _lay_order(spec: DecodeSpec, a: int, b: int, rows: int, t: int) -> DecodeSpec:
    """The spec with a user-given grouping (group ids per position: [T] for every request, or one row
    per request [N, T]) laid over a chunk's buffer: requests a..b, `rows` rows, `t` positions (the
    padding's ids are never read: padding is not blank)."""
    if isinstance(spec.order, str):
        return spec
    order = np.asarray(spec.order)
    if order.shape[-1] > t:
        raise DecodeError(f"DecodeSpec.order has {order.shape[-1]} group ids per row, more than the row's "
                          f"{t} positions")
    if order.ndim == 2 and order.shape[0] != 1:
        order = order[a:b]
        order = np.concatenate([order, np.zeros((rows - len(order), order.shape[1]), order.dtype)])
    return dataclasses.replace(spec, order=np.pad(order, [(0, 0)] * (order.ndim - 1) + [(0, t - order.shape[-1])]))


def _chunk_seeds(sp: SamplingParams, a: int, b: int, rows: int):
    """The seeds of a chunk of `rows` rows holding requests a..b: the one seed, or those rows' own
    seeds with 0 for the filler rows."""
    return sp.seed if not sp.per_row_seeds else sp.seed[a:b] + (0,) * (rows - (b - a))


def _stop(new: np.ndarray, cfg: ModelConfig, spec: DecodeSpec) -> int:
    """How many of a row's new tokens are its continuation: up to and including the EOS that stopped
    it, else all."""
    eos = stop_token(cfg, spec)
    hit = np.flatnonzero(new == eos)
    if spec.stop_at_eos is not False and eos >= 0 and len(hit):
        return int(hit[0]) + 1
    return len(new)
