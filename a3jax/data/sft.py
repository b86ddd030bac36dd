"""Supervised fine-tuning data (`data.format: sft`, docs/post-training.md): JSONL examples with
`prompt` + `response` strings or a chat `messages` list, packed into rows with segment ids; the loss is
on the response tokens only.

An example becomes one segment, BOS + context + response + EOS:

    context   the prompt (plain) or the conversation up to the assistant's turn rendered by the
              tokenizer's chat template (a3jax.data.chat; plain format without one), BOS included
    response  the response (or what the template adds for the last assistant message), EOS appended
              (with data.sft_response_pad: EOS up to that many tokens): the only targets (loss_mask 1)

Layout (`layout_sft_row`): the context (BOS + prompt) left to right, one token per group, as
decoding lays out a prompt for a model with model.prompt_group_size 1 (what an SFT run records:
a3jax.data.grouping.prompt_group_size_for), and the response grouped by the curriculum stage's
strategy after it, so the fine-tuned model keeps any-order decoding of its answers. Context and
response are tokenized separately (as a prompt is at decoding time). An example longer than data.seq_len is skipped and counted; none fitting is an error.
The held-out split is by key (`path:line`), as for text sources (a3jax.data.sources).
"""
from __future__ import annotations


import numpy as np

from a3jax import fs
from a3jax.layout import Layout

from . import chat
from .grouping import group_document
from .packing import plan_packing
from .rows import prompt_groups
from .sources import check_split, in_split

FORMATS = ("text", "sft")


class SFTDataError(ValueError):
    """A bad SFT example (names the file and line) or a file with none that fits."""


def example_texts(ex: dict, template, where: str) -> tuple[str, str]:
    """(context, response) texts of one JSONL example."""
    if "messages" in ex:
        try:
            return chat.split(ex["messages"], template)
        except chat.ChatError as e:
            raise SFTDataError(f"{where}: {e}") from None
    if isinstance(ex.get("prompt"), str) and isinstance(ex.get("response"), str):
        if template is None:
            return ex["prompt"], ex["response"]
        return chat.split([{"role": "user", "content": ex["prompt"]},
                           {"role": "assistant", "content": ex["response"]}], template)
    raise SFTDataError(f"{where}: an SFT example needs string fields `prompt` and `response`, or `messages`")


class SFTRows:
    """Random-access packed SFT rows: {tokens, positions, segment_ids, response} int32 [seq_len]
    (response: 1 at each response token and its EOS)."""

    def __init__(self, source: str, tokenizer, seq_len: int, split: str = "train", heldout_fraction: float = 0.05,
                 shuffle_seed: int = 0, max_documents: int = 0, template=None, response_pad: int = 0):
        check_split(split)
        self.bos_id, self.eos_id, self.pad_id = int(tokenizer.bos_id), int(tokenizer.eos_id), int(tokenizer.pad_id)
        if template is None:
            template = chat.template_of(getattr(tokenizer, "spec", ""))
        self.examples, self.skipped = [], 0
        if not fs.isfile(source):
            raise FileNotFoundError(f"data.source {source}: no such SFT JSONL file")
        for n, ex in fs.read_jsonl(source, SFTDataError):
            where = f"{source}:{n}"
            if not in_split(where, split, heldout_fraction):
                continue
            ctx, resp = example_texts(ex if isinstance(ex, dict) else {}, template, where)
            c, r = list(tokenizer.encode(ctx)), list(tokenizer.encode(resp))
            if not r:
                raise SFTDataError(f"{where}: the response is empty")
            r += [self.eos_id] * (int(response_pad) - len(r) - 1)  # EOS padding (the row adds one more)
            if len(c) + len(r) + 2 > seq_len:
                self.skipped += 1
                continue
            self.examples.append((np.asarray(c, np.int32), np.asarray(r, np.int32)))
            if max_documents and len(self.examples) >= max_documents:
                break
        if not self.examples:
            raise SFTDataError(f"{source}: no SFT example of split {split!r} fits data.seq_len={seq_len} "
                               f"({self.skipped} too long)")
        lengths = [len(c) + len(r) for c, r in self.examples]
        order = np.random.default_rng([int(shuffle_seed) & 0xFFFFFFFF, 1]).permutation(len(lengths))
        self.plan = plan_packing(lengths, seq_len, order)

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, r: int) -> dict:
        p, t = self.plan, self.plan.seq_len
        r = int(r)
        if not 0 <= r < len(self):
            raise IndexError(f"row {r} out of range [0, {len(self)})")
        tokens = np.full(t, self.pad_id, np.int32)
        positions = np.zeros(t, np.int32)
        segs = np.zeros(t, np.int32)
        resp = np.zeros(t, np.int32)
        at = 0
        for k, s in enumerate(range(p.row_ptr[r], p.row_ptr[r + 1]), 1):
            c, rr = self.examples[int(p.seg_doc[s])]
            ids = np.concatenate([[self.bos_id], c, rr, [self.eos_id]])
            n = len(ids)
            tokens[at:at + n] = ids
            positions[at:at + n] = np.arange(n)
            segs[at:at + n] = k
            resp[at + 1 + len(c):at + n] = 1
            at += n
        return {"tokens": tokens, "positions": positions, "segment_ids": segs, "response": resp}


def layout_sft_row(row: dict, strategy: str, rng: np.random.Generator) -> dict:
    """A packed SFT row -> the generation-order layout (a3jax.layout keys, sorted by group): per
    segment the context left to right, then the response grouped by `strategy`;
    loss_mask = the response tokens."""
    tokens, positions = np.asarray(row["tokens"], np.int32), np.asarray(row["positions"], np.int32)
    segs, resp = np.asarray(row["segment_ids"], np.int32), np.asarray(row["response"], np.int32)
    t = len(tokens)
    groups = np.zeros(t, np.int64)
    offset = 0
    for s in [s for s in np.unique(segs) if s]:
        idx = np.flatnonzero(segs == s)
        idx = idx[np.argsort(positions[idx], kind="stable")]
        ctx, rsp = idx[resp[idx] == 0], idx[resp[idx] == 1]
        cg = prompt_groups(np.ones(len(ctx), bool), 1)
        start = int(cg.max()) + 1
        rg = group_document(strategy, len(rsp), rng, anchor_bos=False, tokens=tokens[rsp])
        groups[ctx] = cg + offset
        groups[rsp] = np.asarray(rg, np.int64) + start + offset
        offset = int(groups[idx].max()) + 1
    groups[segs == 0] = offset
    order = np.argsort(groups, kind="stable")
    loss = ((resp != 0) & (segs != 0)).astype(np.int32)
    return Layout(tokens[order], positions[order], groups[order].astype(np.int32), segs[order],
                  loss[order]).as_dict()
