"""The tokenizer a GGUF file describes, rebuilt as a `tokenizers.Tokenizer` from its metadata.

A GGUF carries no tokenizer.json: `tokenizer.ggml.model` names the kind, `tokenizer.ggml.tokens` /
`scores` / `token_type` / `merges` the vocabulary, `tokenizer.ggml.pre` the pre-tokenizer, and
`tokenizer.ggml.{bos,eos,unknown,padding}_token_id` / `add_bos_token` the special tokens. Two kinds
are built (the others are refused, naming the key):

* `gpt2`: byte-level BPE (SmolLM, Llama 3, ...). The vocabulary is already in the byte-to-unicode
  spelling; the pre-tokenizer follows llama.cpp's table for `tokenizer.ggml.pre` (see PRE_TOKENIZERS).
* `llama`: SentencePiece BPE with byte fallback (Llama 1/2, Mistral, ...): `▁` for spaces, a prefix
  space on the first piece when `tokenizer.ggml.add_space_prefix` (default true), merges from the file
  or, when it has none, recovered from the vocabulary and its scores.

Control tokens (token type 3) become special added tokens and user-defined ones (4) plain added
tokens, so both are matched whole in text. `write_tokenizer` puts tokenizer.json,
tokenizer_config.json and special_tokens_map.json in a directory, which `data.tokenizer=DIR`,
`a3jax.data.tokenizers.load_tokenizer` and transformers' `AutoTokenizer` all read.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from a3jax.convert.gguf_io import GGUFFile, open_gguf
from a3jax.convert.hf import ConversionError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(regex: Optional[str] = None, digits: bool = False):
    """GPT-2's byte-level pre-tokenizer; `regex` replaces its split, `digits` splits digits first."""
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    return pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> pre-tokenizer, after llama.cpp's table (llama-vocab.cpp): `smollm` isolates
# every digit, then splits with GPT-2's pattern, as SmolLM's own tokenizer.json does.
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(), "gpt-2": lambda: _byte_level(), "gpt2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT), "llama-v3": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
}
MODELS = ("gpt2", "llama")


def _merges(g: GGUFFile, tokens: list[str], vocab: dict) -> list[tuple[str, str]]:
    merges = g.get("tokenizer.ggml.merges")
    if merges:
        out = []
        for i, m in enumerate(merges):
            pair = m.split(" ")
            if len(pair) != 2:
                raise ConversionError(f"{g.path}: tokenizer.ggml.merges[{i}] = {m!r} is not two tokens")
            out.append((pair[0], pair[1]))
        return out
    scores = g.get("tokenizer.ggml.scores")
    if scores is None:
        raise ConversionError(f"{g.path}: a SentencePiece vocabulary needs tokenizer.ggml.merges or "
                              f"tokenizer.ggml.scores; the file has neither")
    return merges_from_scores(tokens, scores, vocab)


def merges_from_scores(tokens: list[str], scores, vocab: dict) -> list[tuple[str, str]]:
    """SentencePiece BPE merges from its vocabulary: every split of a token into two vocabulary
    tokens is a merge, ranked by the merged token's score (higher first), ties by the pieces' ids."""
    ranked = []
    for tok, score in zip(tokens, scores):
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            if a in vocab and b in vocab:
                ranked.append((-float(score), vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict]:
    """(tokenizers.Tokenizer, tokenizer_config dict) from the file's metadata."""
    model = g.get("tokenizer.ggml.model")
    if model is None:
        raise ConversionError(f"{g.path}: no tokenizer in the file (metadata key 'tokenizer.ggml.model' is missing)")
    if model not in MODELS:
        raise ConversionError(f"{g.path}: tokenizer.ggml.model={model!r} is not supported (byte-level BPE 'gpt2' "
                              f"and SentencePiece 'llama' are)")
    pre = g.get("tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise ConversionError(f"{g.path}: tokenizer.ggml.pre={pre!r} is not supported (one of "
                              f"{', '.join(sorted(PRE_TOKENIZERS))})")
    tokens = list(g.need("tokenizer.ggml.tokens"))
    types = list(g.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError(f"{g.path}: tokenizer.ggml.tokens has duplicate entries")
    merges = _merges(g, tokens, vocab)
    unk_id = g.get("tokenizer.ggml.unknown_token_id")
    add_bos = g.get("tokenizer.ggml.add_bos_token")
    if model == "gpt2":
        tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
        tok.decoder = decoders.ByteLevel()
        add_bos = bool(add_bos) if add_bos is not None else False
    else:
        prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
        unk = tokens[int(unk_id)] if unk_id is not None else None
        tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        add_bos = bool(add_bos) if add_bos is not None else True  # llama.cpp's default for SentencePiece
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])

    def name(key):
        v = g.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not 0 <= int(v) < len(tokens):
            raise ConversionError(f"{g.path}: tokenizer.ggml.{key}={v} is outside the vocabulary of {len(tokens)}")
        return tokens[int(v)]

    special = {"bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
               "unk_token": name("unknown_token_id"), "pad_token": name("padding_token_id")}
    add_eos = bool(g.get("tokenizer.ggml.add_eos_token", False))
    single = ([f"{special['bos_token']}:0"] if add_bos and special["bos_token"] else []) + ["$A:0"] + (
        [f"{special['eos_token']}:0"] if add_eos and special["eos_token"] else [])
    if len(single) > 1:
        used = {t.split(":")[0] for t in single if not t.startswith("$")}
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single),
                                                           special_tokens=[(t, vocab[t]) for t in sorted(used)])
    config = {k: v for k, v in special.items() if v is not None}
    config.update(add_bos_token=add_bos, add_eos_token=add_eos, tokenizer_class="PreTrainedTokenizerFast",
                  model_max_length=int(g.get(f"{g.get('general.architecture', 'llama')}.context_length", 2048) or 2048),
                  clean_up_tokenization_spaces=False)
    template = g.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def write_tokenizer(gguf, out_dir: str) -> list[str]:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json for the tokenizer of
    `gguf` (a path or a GGUFFile) into out_dir; returns the file names."""
    tok, config = build_tokenizer(open_gguf(gguf))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config}, f,
                  indent=2)
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
