"""Text <-> ids for the decoders: the checkpoint's tokenizer, prompts, and texts with [MASK:n] blanks."""
from __future__ import annotations

import re

import numpy as np

from a3jax.checkpoint import tokenizer_spec
from a3jax.data.rows import placeholder_id
from a3jax.data.tokenizers import load_tokenizer

MASK_RE = re.compile(r"\[MASK:(\d+)\]")


def load_tok(spec: str, ckpt: str):
    """spec 'auto': the checkpoint's own (a3jax.checkpoint.tokenizer_spec: its tokenizer files, a run
    directory's training tokenizer, else the byte tokenizer)."""
    return load_tokenizer(tokenizer_spec(ckpt) if spec == "auto" else spec)


def prompt_ids(tok, text: str, content: bool) -> list:
    """BOS + the text's ids. The content stream (a plain causal LM) gets BOS only when its tokenizer
    adds one (or the text is empty); the query stream always conditions on BOS."""
    ids = list(tok.encode(text))
    bos = not content or getattr(tok, "add_bos", True) or not ids
    return ([tok.bos_id] if bos else []) + ids


def completion_text(tok, ids) -> str:
    """The text of generated ids, the tokenizer's pad and EOS left out."""
    return tok.decode([int(x) for x in ids if int(x) not in (tok.pad_id, tok.eos_id)])


def parse_masked(text: str, tok):
    """Text with [MASK:n] blanks -> (ids, known, spans): ids start with BOS (known); each blank is n
    placeholder tokens (a3jax.data.rows.placeholder_id); spans are the blanks' (start, end) token ranges."""
    placeholder = placeholder_id(tok)
    ids, known, spans = [tok.bos_id], [True], []
    pos = 0
    for m in MASK_RE.finditer(text):
        piece = tok.encode(text[pos:m.start()])
        ids += piece
        known += [True] * len(piece)
        n = int(m.group(1))
        if n < 1:
            raise ValueError(f"blank {m.group(0)!r} must have at least one token")
        spans.append((len(ids), len(ids) + n))
        ids += [placeholder] * n
        known += [False] * n
        pos = m.end()
    piece = tok.encode(text[pos:])
    ids += piece
    known += [True] * len(piece)
    if not spans:
        raise ValueError("no blanks in the text: mark each one as [MASK:n] (n = number of tokens to fill)")
    return np.asarray(ids), np.asarray(known), spans


def render(tok, ids, spans, hilite=None) -> str:
    """Decoded text (BOS dropped); each span wrapped in hilite = (before, after) when given."""
    out, pos = [], 1
    for a, b in spans:
        out.append(tok.decode(ids[pos:a]))
        filled = tok.decode(ids[a:b])
        out.append(f"{hilite[0]}{filled}{hilite[1]}" if hilite else filled)
        pos = b
    out.append(tok.decode(ids[pos:]))
    return "".join(out)
