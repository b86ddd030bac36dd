"""Evaluation tasks on local JSONL files (formats in docs/evaluate.md).

    multiple_choice  {"context": str, "choices": [str, ...], "label": int}
                     acc (highest log P(choice | context)) and acc_norm (per character of the choice)
    infill           {"left": str, "answer": str, "right": str}   ROUGE-1/2/L F1 of the filled blank
                     (the blank has as many tokens as the answer: the ROCStories protocol)
    qa               {"question": str, "answers": [str, ...]}      exact match of the greedy answer
                     (generated until a newline, normalised SQuAD style)
    perplexity       {"text": str}                                 ppl / bits per byte under an ordering

A line may carry "kind"; otherwise it is inferred from its fields. `A3Evaluator` wraps
(cfg, params, tokenizer) with batched scoring/decoding shared by these tasks and the lm-eval adapter.

`stream="content"` evaluates the content stream: the causal base LLaMA (a converted model before A3
adaptation), the AR baseline. It scores and generates left to right only (group size 1, AR context
and perplexity order; no infill tasks), and follows the tokenizer's add_bos: without it (SmolLM2)
BOS is put before a text only when nothing else precedes the first scored token.
"""
from __future__ import annotations

import dataclasses
import math
import re
import string
from typing import Optional

import numpy as np

from a3jax import fs
from a3jax.config import ModelConfig
from a3jax.data import rows as rows_lib
from a3jax.decode import DecodeSpec, SamplingParams, generate, infill
from a3jax.score import ScoreError, bucket, score_rows

KINDS = ("multiple_choice", "infill", "qa", "perplexity")


class TaskError(ValueError):
    """A malformed task file or line."""


def infer_kind(obj: dict) -> str:
    if "kind" in obj:
        if obj["kind"] not in KINDS:
            raise TaskError(f"unknown kind {obj['kind']!r}; one of {KINDS}")
        return obj["kind"]
    if "choices" in obj:
        return "multiple_choice"
    if "answer" in obj and ("left" in obj or "right" in obj):
        return "infill"
    if "answers" in obj or "question" in obj:
        return "qa"
    if "text" in obj:
        return "perplexity"
    raise TaskError(f"cannot tell the task kind of a line with fields {sorted(obj)}; add \"kind\"")


REQUIRED = {"multiple_choice": ("context", "choices", "label"), "infill": ("left", "answer", "right"),
            "qa": ("question", "answers"), "perplexity": ("text",)}


def load_task(path: str, limit: Optional[int] = None) -> dict[str, list[dict]]:
    """kind -> examples, validated (the error names the file and line)."""
    out: dict[str, list[dict]] = {}
    for n, ex in fs.read_jsonl(path, TaskError):
        try:
            kind = infer_kind(ex)
            missing = [k for k in REQUIRED[kind] if k not in ex]
            if missing:
                raise TaskError(f"{kind} line lacks {missing}")
            if kind == "multiple_choice" and not (0 <= int(ex["label"]) < len(ex["choices"])):
                raise TaskError(f"label {ex['label']} is not an index into {len(ex['choices'])} choices")
            if kind == "qa" and isinstance(ex["answers"], str):
                ex["answers"] = [ex["answers"]]
        except TaskError as e:
            raise TaskError(f"{path}:{n}: {e}") from None
        out.setdefault(kind, []).append(ex)
    if limit:
        out = {k: v[:limit] for k, v in out.items()}
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


class A3Evaluator:
    """Batched exact scoring and decoding for (cfg, params, tokenizer)."""

    def __init__(self, cfg: ModelConfig, params, tokenizer, batch_size: int = 8, stream: str = "query"):
        if stream not in ("query", "content"):
            raise TaskError(f"stream must be 'query' or 'content', got {stream!r}")
        # the layer loop as lax.scan: one compiled layer body instead of L (same params and outputs; on
        # a 30-layer model a fifth of the scorer's compile time, and no slower to run)
        self.cfg = dataclasses.replace(cfg, scan_layers=True)
        self.params, self.tok, self.batch_size = params, tokenizer, int(batch_size)
        self.stream = stream

    def _bos(self, follows: int) -> list:
        """BOS before a text with `follows` tokens ahead of the first scored/generated one: always for
        the query stream (its anchor), for the content stream as the tokenizer's add_bos says
        (or when nothing precedes)."""
        if self.stream == "query" or getattr(self.tok, "add_bos", True) or follows == 0:
            return [self.tok.bos_id]
        return []

    @property
    def max_length(self) -> int:
        return self.cfg.max_position_embeddings

    def _pad(self):
        return self.tok.pad_id if self.tok.pad_id is not None else 0

    def score_length(self, rows) -> Optional[int]:
        """One padded length for every batch of `rows` (the longest row's bucket), so a call compiles the
        scorer once, unless that pads more than twice the tokens of per-batch buckets (long tails in
        big evaluations, where running the padding costs more than the compiles it saves): then None."""
        lens = [len(r[0]) for r in rows]
        if not lens:
            return None
        per_batch = [min(bucket(max(lens[s:s + self.batch_size])), self.max_length)
                     for s in range(0, len(lens), self.batch_size)]
        one = max(per_batch)
        return one if one * len(per_batch) <= 2 * sum(per_batch) else None

    def score_rows(self, rows):
        """rows: list of (ids, groups, target mask) -> list of (sum log p over target, all greedy)
        (a3jax.score.score_rows, in fixed [batch_size, length] shapes: few compiles)."""
        try:
            return score_rows(self.cfg, self.params, rows, self.batch_size, self._pad(), stream=self.stream,
                              length=self.score_length(rows))
        except ScoreError as e:
            raise TaskError(str(e)) from None

    def continuation_row(self, context: str, continuation: str, group_size: int = 1, context_order: str = "ar"):
        """BOS + context (AR, or one group with 'one') + continuation as AR groups of group_size;
        the target is the continuation. Long inputs keep their rightmost tokens."""
        ctx = list(self.tok.encode(context))
        cont = list(self.tok.encode(continuation))
        if not cont:
            raise TaskError(f"empty continuation after context {context[-40:]!r}")
        keep = self.max_length - 1 - len(cont)
        if keep < 0:
            raise TaskError(f"continuation of {len(cont)} tokens does not fit max_position_embeddings")
        ctx = ctx[len(ctx) - keep:] if len(ctx) > keep else ctx
        if self.stream == "content":
            ids = self._bos(len(ctx)) + ctx + cont
            m = np.zeros(len(ids), bool)
            m[len(ids) - len(cont):] = True
            if group_size != 1 or context_order != "ar":
                raise TaskError(f"the content stream scores left to right: group_size={group_size}, "
                                f"context_order={context_order!r} do not apply (use 1 and 'ar')")
            return np.asarray(ids), np.arange(len(ids), dtype=np.int32), m
        ids = [self.tok.bos_id] + ctx + cont
        m = np.zeros(len(ids), bool)
        m[1 + len(ctx):] = True
        return np.asarray(ids), rows_lib.context_target_groups(len(ctx), len(cont), group_size, context_order), m

    def loglikelihood(self, pairs, group_size: int = 1, context_order: str = "ar"):
        """[(context, continuation)] -> [(log P(continuation | context), greedy?)]."""
        return self.score_rows([self.continuation_row(c, x, group_size, context_order) for c, x in pairs])

    def rolling_rows(self, text: str, strategy: str = "ar", seed: int = 0, index: int = 0):
        """Whole-text rows: BOS + up to max_length-1 tokens per window (disjoint windows), grouped
        by the strategy after the anchored BOS; every text token is a target exactly once."""
        ids = list(self.tok.encode(text))
        w = self.max_length - 1
        return [rows_lib.text_row(self.tok.bos_id, ids[s:s + w], strategy, seed, rows_lib.window_index(index, k))
                for k, s in enumerate(range(0, max(len(ids), 1), w))]

    def rolling_loglikelihood(self, texts, strategy: str = "ar", seed: int = 0):
        rows, owner = [], []
        for i, t in enumerate(texts):
            r = self.rolling_rows(t, strategy, seed, i)
            rows += r
            owner += [i] * len(r)
        scores = self.score_rows(rows)
        out = [0.0] * len(texts)
        for i, (ll, _) in zip(owner, scores):
            out[i] += ll
        return out

    def generate(self, contexts, max_new_tokens: int = 32, until=("\n",), order="left_to_right",
                 group_size: int = 1, temperature: float = 0.0, seed: int = 0):
        """Greedy (default) continuation of each context, cut at the first `until` string."""
        outs = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start:start + self.batch_size]
            keep = self.max_length - int(max_new_tokens) - 1
            seqs = []
            for c in chunk:
                ids = list(self.tok.encode(c))
                ids = ids[len(ids) - keep:] if len(ids) > keep else ids
                seqs.append(self._bos(len(ids)) + ids)
            # fixed batch size (copies, dropped) and bucketed buffer length: few distinct compiles
            seqs += [seqs[0]] * (self.batch_size - len(seqs))
            need = max(len(q) for q in seqs) + int(max_new_tokens)
            if self.stream == "content":
                if group_size != 1 or order != "left_to_right":
                    raise TaskError(f"the content stream generates left to right one token at a time: "
                                    f"order={order!r}, group_size={group_size} do not apply")
                spec = DecodeSpec(stream="content", eos_id=self.tok.eos_id)
            else:  # the model's own stream: an ar model's content stream (order and group size must be plain)
                spec = DecodeSpec(order=order, group_size=group_size, eos_id=self.tok.eos_id)
            new = generate(self.cfg, self.params, seqs, int(max_new_tokens), spec,
                           SamplingParams(temperature=temperature, seed=seed),
                           buffer_length=min(bucket(need), self.max_length)).new
            for row in new[:len(chunk)]:
                text = self.tok.decode([int(x) for x in row if int(x) not in (self.tok.pad_id, self.tok.eos_id)])
                cut = len(text)
                for u in until or ():
                    if u and u in text:
                        cut = min(cut, text.index(u))
                outs.append(text[:cut])
        return outs

    def infill_texts(self, items, order="confidence", group_size: int = 1, temperature: float = 0.0,
                     seed: int = 0) -> list[str]:
        """items: [(left, right, n_tokens)] -> the text filled into each n-token blank. Batched, rows
        padded to a bucketed length (padding is neither context nor blank)."""
        if self.stream == "content":
            raise TaskError("infill tasks need the query stream (the content stream only continues a text "
                            "left to right); evaluate them without --stream content")
        place = rows_lib.placeholder_id(self.tok)
        outs = []
        for start in range(0, len(items), self.batch_size):
            chunk = list(items[start:start + self.batch_size])
            rows = []
            for left, right, n in chunk:
                lid, rid = list(self.tok.encode(left)), list(self.tok.encode(right))
                rows.append(([self.tok.bos_id] + lid + [place] * n + rid, 1 + len(lid), n))
            rows += [rows[0]] * (self.batch_size - len(rows))
            t = min(bucket(max(len(r[0]) for r in rows)), self.max_length)
            if max(len(r[0]) for r in rows) > t:
                raise TaskError(f"an infill example exceeds max_position_embeddings={self.max_length}")
            ids, known, valid = rows_lib.blank_rows(rows, t, self._pad(), place)
            out = infill(self.cfg, self.params, ids, known, DecodeSpec(order=order, group_size=group_size),
                         SamplingParams(temperature=temperature, seed=seed), valid).tokens
            for i, (_, a, n) in enumerate(rows[:len(chunk)]):
                outs.append(self.tok.decode([int(x) for x in out[i, a:a + n]]))
        return outs


# ----------------------------------------------------------------------------- metrics


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def rouge(predictions, references) -> dict:
    from rouge_score import rouge_scorer  # deferred: rouge_score imports nltk (~2 s), only infill tasks need it

    sc = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    tot = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for p, r in zip(predictions, references):
        s = sc.score(r, p)
        for k in tot:
            tot[k] += s[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100.0 * v / n for k, v in tot.items()}


# ----------------------------------------------------------------------------- task runners


def eval_multiple_choice(ev: A3Evaluator, examples, group_size: int = 1, context_order: str = "ar"):
    pairs, spans = [], []
    for ex in examples:
        spans.append((len(pairs), len(ex["choices"])))
        pairs += [(ex["context"], ch) for ch in ex["choices"]]
    lls = [ll for ll, _ in ev.loglikelihood(pairs, group_size, context_order)]
    acc = acc_norm = 0.0
    preds = []
    for ex, (s, n) in zip(examples, spans):
        ll = np.asarray(lls[s:s + n])
        lens = np.asarray([max(len(c), 1) for c in ex["choices"]], np.float64)
        pred, pred_n = int(np.argmax(ll)), int(np.argmax(ll / lens))
        acc += pred == int(ex["label"])
        acc_norm += pred_n == int(ex["label"])
        preds.append(dict(pred=pred, pred_norm=pred_n, ll=ll.tolist()))
    n = max(len(examples), 1)
    return {"acc": 100.0 * acc / n, "acc_norm": 100.0 * acc_norm / n}, preds


def eval_infill(ev: A3Evaluator, examples, order="confidence", group_size: int = 1):
    items = [(ex["left"], ex["right"], max(int(ex.get("length") or len(ev.tok.encode(ex["answer"]))), 1))
             for ex in examples]
    preds = ev.infill_texts(items, order=order, group_size=group_size)
    return rouge(preds, [ex["answer"] for ex in examples]), preds


def eval_qa(ev: A3Evaluator, examples, max_new_tokens: int = 32, group_size: int = 1):
    prompts = [ex.get("prompt", "Question: {question}\nAnswer:").format(question=ex["question"]) for ex in examples]
    preds = ev.generate(prompts, max_new_tokens=max_new_tokens, until=("\n",), group_size=group_size)
    em = [exact_match(p, ex["answers"]) for p, ex in zip(preds, examples)]
    return {"exact_match": 100.0 * float(np.mean(em)) if em else 0.0}, preds


def eval_perplexity(ev: A3Evaluator, examples, strategy: str = "ar", seed: int = 0):
    texts = [ex["text"] for ex in examples]
    lls = ev.rolling_loglikelihood(texts, strategy, seed)
    ntok = sum(len(ev.tok.encode(t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    tot = sum(lls)
    return {"ppl": math.exp(min(-tot / max(ntok, 1), 700.0)), "nll_per_token": -tot / max(ntok, 1),
            "bits_per_byte": -tot / math.log(2) / max(nbytes, 1)}, lls


def run_task(ev: A3Evaluator, path: str, limit=None, order: str = "ar", seed: int = 0, group_size: int = 1,
             context_order: str = "ar", infill_order: str = "confidence", infill_group_size: int = 1,
             max_new_tokens: int = 32):
    """All kinds found in one JSONL file -> {kind: {"n": count, metrics...}}."""
    results = {}
    for kind, examples in load_task(path, limit).items():
        if kind == "multiple_choice":
            m, _ = eval_multiple_choice(ev, examples, group_size, context_order)
        elif kind == "infill":
            m, _ = eval_infill(ev, examples, infill_order, infill_group_size)
        elif kind == "qa":
            m, _ = eval_qa(ev, examples, max_new_tokens, group_size)
        else:
            m, _ = eval_perplexity(ev, examples, order, seed)
        results[kind] = dict(n=len(examples), **m)
    return results
