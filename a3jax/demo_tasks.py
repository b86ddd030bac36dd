"""The demo's synthetic any-order tasks (docs/demo.md, "Any-order tasks"): examples, blanks, chance.

Each task is a one-line document whose answer to a `right_context` blank is written only to the right
of it (a left-to-right LM can only guess), and whose `prefix_suffices` blank is determined by the
text before it (a left-to-right LM can fill it too):

  mirror    a word and its mirror          `qwerty=ytrewq`   right: 3 letters of the word; prefix: 3 of the mirror
  tag       an element named by its closer `<abc>xyzw</abc>` right: the opening name;    prefix: the closing name
  brackets  nested brackets                `([{<>}])`        right: an opener;           prefix: a closer

Training examples go into the demo's corpus (`tasks.jsonl` beside the standard library's source);
the evaluation items come from another stream of the same seed and never occur in the training file.
"""
from __future__ import annotations

import json
import os
import random
import string

import numpy as np

TASKS = ("mirror", "tag", "brackets")
KINDS = ("right_context", "prefix_suffices")
LETTERS = string.ascii_lowercase
PAIRS = {"(": ")", "[": "]", "{": "}", "<": ">"}
OPENERS = tuple(PAIRS)
MIRROR_BLANK = 3  # letters blanked in the word (right_context) or in its mirror (prefix_suffices)


def _rng(seed: int, stream: int) -> random.Random:
    """Python's generator (a string seed hashes the same on every platform and version): training
    examples, evaluation items and `both` items are separate streams of one seed."""
    return random.Random(f"a3jax-demo-tasks:{seed}:{stream}")


def _word(rng, lo: int, hi: int) -> str:
    return "".join(rng.choices(LETTERS, k=rng.randint(lo, hi)))


def _brackets(rng, pairs: int) -> str:
    """A random well-formed sequence of `pairs` bracket pairs: every closer names its opener."""
    out, stack, opened = [], [], 0
    while opened < pairs or stack:
        if opened < pairs and (not stack or rng.random() < 0.6):
            o = rng.choice(OPENERS)
            out.append(o)
            stack.append(o)
            opened += 1
        else:
            out.append(PAIRS[stack.pop()])
    return "".join(out)


def make_example(task: str, rng: random.Random) -> str:
    if task == "mirror":
        w = _word(rng, 4, 8)
        return f"{w}={w[::-1]}"
    if task == "tag":
        name = _word(rng, 3, 5)
        return f"<{name}>{_word(rng, 2, 6)}</{name}>"
    if task == "brackets":
        return _brackets(rng, rng.randint(3, 6))
    raise ValueError(f"unknown demo task {task!r} (known: {', '.join(TASKS)})")


def _match(text: str) -> dict[int, int]:
    """Opener offset -> its closer's offset."""
    out, stack = {}, []
    for i, c in enumerate(text):
        if c in PAIRS:
            stack.append(i)
        else:
            out[stack.pop()] = i
    return out


def blank(task: str, text: str, kind: str, rng: random.Random) -> tuple[int, int]:
    """[start, end) character offsets of one blank of `kind` in an example of `task`."""
    if kind not in KINDS:
        raise ValueError(f"unknown blank kind {kind!r} (known: {', '.join(KINDS)})")
    if task == "mirror":
        n = text.index("=")
        lo = 0 if kind == "right_context" else n + 1
        a = lo + rng.randint(0, n - MIRROR_BLANK)
        return a, a + MIRROR_BLANK
    if task == "tag":
        a = 1 if kind == "right_context" else text.rindex("</") + 2
        return a, text.index(">", a)
    if task == "brackets":
        opener = rng.choice(sorted(_match(text)))
        a = opener if kind == "right_context" else _match(text)[opener]
        return a, a + 1
    raise ValueError(f"unknown demo task {task!r} (known: {', '.join(TASKS)})")


def chance(task: str, answer: str) -> float:
    """The probability that a uniform guess from the answer's alphabet is exactly right."""
    alphabet = len(PAIRS) if task == "brackets" else len(LETTERS)
    return float(alphabet) ** -len(answer)


def training_examples(count: int, seed: int) -> list[str]:
    """`count` examples of each task, interleaved, from the training seed."""
    rng = _rng(seed, 0)
    return [make_example(t, rng) for _ in range(count) for t in TASKS]


def eval_items(count: int, seed: int, exclude=frozenset()) -> list[dict]:
    """Per task and blank kind `count` held-out items (task, kind, text, start, end), none of whose
    texts is in `exclude` (the training examples), drawn from a seed the training file never uses."""
    rng = _rng(seed, 1)
    items, seen = [], set(exclude)
    for task in TASKS:
        for kind in KINDS:
            n = 0
            while n < count:
                text = make_example(task, rng)
                if text in seen:
                    continue
                seen.add(text)
                a, b = blank(task, text, kind, rng)
                items.append(dict(task=task, kind=kind, text=text, start=a, end=b))
                n += 1
    return items


def both_items(count: int, seed: int, exclude=frozenset()) -> list[dict]:
    """Mirror examples with the same 3 letters blanked in the word and in the mirror: any letters are
    a right answer if both halves agree (`spans` holds both blanks); the two halves depend on each
    other, which is what committing several tokens per step cannot see."""
    rng = _rng(seed, 2)
    items, seen = [], set(exclude)
    while len(items) < count:
        text = make_example("mirror", rng)
        if text in seen:
            continue
        seen.add(text)
        n = text.index("=")
        a = rng.randint(0, n - MIRROR_BLANK)
        m = 2 * n - (a + MIRROR_BLANK) + 1  # the same letters in the mirror
        items.append(dict(task="mirror", kind="both", text=text, spans=[(a, a + MIRROR_BLANK), (m, m + MIRROR_BLANK)]))
    return items


def consistent(item: dict, filled: str) -> bool:
    """Both halves of a `both` item agree: the filled word's mirror is the filled mirror."""
    n = filled.index("=") if "=" in filled else -1
    return n > 0 and filled[:n][::-1] == filled[n + 1:]


def write_corpus(out_dir: str, code_files: list[tuple[str, str]], examples: list[str]) -> str:
    """The demo's training corpus: the code files (relative key, path) copied under their keys (so the
    code's held-out split is unchanged) and the task examples as `tasks.jsonl`, one per line. Files
    already there with the same content are kept."""
    import shutil

    os.makedirs(out_dir, exist_ok=True)
    for key, path in code_files:
        dst = os.path.join(out_dir, key)
        if not os.path.isfile(dst) or os.path.getsize(dst) != os.path.getsize(path):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(path, dst)
    body = "".join(json.dumps({"text": t}) + "\n" for t in examples)
    dst = os.path.join(out_dir, "tasks.jsonl")
    if not os.path.isfile(dst) or open(dst).read() != body:
        with open(dst, "w") as f:
            f.write(body)
    return out_dir


# ----------------------------------------------------------------------------- decoding and scoring


def _spans(item: dict) -> list[tuple[int, int]]:
    return [tuple(s) for s in item["spans"]] if "spans" in item else [(item["start"], item["end"])]


def _answer(item: dict, filled: str) -> str:
    return "".join(filled[a:b] for a, b in _spans(item))


def blank_batch(tok, items):
    """BOS + text + EOS per item (a training document), its blanks unknown -> (tokens, known, valid)."""
    from a3jax.data.rows import placeholder_id

    rows = [[tok.bos_id] + list(tok.encode(it["text"])) + [tok.eos_id] for it in items]
    t = max(len(r) for r in rows)
    tokens = np.full((len(rows), t), tok.pad_id, np.int32)
    known = np.ones((len(rows), t), bool)
    valid = np.zeros((len(rows), t), bool)
    for r, (ids, it) in enumerate(zip(rows, items)):
        if not it["text"].isascii():  # offsets are characters; the byte tokenizer's tokens are bytes
            raise ValueError(f"demo task text is not ASCII: {it['text']!r}")
        tokens[r, :len(ids)] = ids
        valid[r, :len(ids)] = True
        for a, b in _spans(it):
            tokens[r, 1 + a:1 + b] = placeholder_id(tok)
            known[r, 1 + a:1 + b] = False
    return tokens, known, valid


def a3_fill(cfg, params, tok, items, spec, sampling=None):
    """A3 fills every item's blanks, prefix and suffix visible -> (filled texts, passes per item):
    passes = the distinct decode steps that committed the item's blanks."""
    from a3jax.decode import SamplingParams, infill

    tokens, known, valid = blank_batch(tok, items)
    res = infill(cfg, params, tokens, known, spec, sampling or SamplingParams(seed=0), valid)
    texts, passes = [], []
    for r, it in enumerate(items):
        texts.append(tok.decode(res.tokens[r, 1:1 + len(it["text"])].tolist()))
        steps = res.step[r][~known[r] & valid[r]]
        passes.append(len(set(steps[steps >= 0].tolist())))
    return texts, passes


def prefix_fill(cfg, params, tok, items) -> list[str]:
    """What a plain LM can do: greedy continuation of the text before the blank, as many tokens as the
    blank has; the filled texts."""
    from a3jax.decode import DecodeSpec, generate

    prompts = [[tok.bos_id] + list(tok.encode(it["text"][:it["start"]])) for it in items]
    n = max(it["end"] - it["start"] for it in items)
    new = generate(cfg, params, prompts, n, DecodeSpec(stop_at_eos=False)).new
    out = []
    for r, it in enumerate(items):
        got = tok.decode(new[r, :it["end"] - it["start"]].tolist())
        out.append(it["text"][:it["start"]] + got + it["text"][it["end"]:])
    return out


def exact(items, filled) -> float:
    return float(np.mean([_answer(it, f) == _answer(it, it["text"]) for it, f in zip(items, filled)]))


ORDERS = ("left_to_right", "confidence", "random")
DECODERS = ORDERS + ("prefix_only",)


def any_order_section(pre_cfg, pre_params, cfg, params, tok, items, context_group_size: int, show: int = 1) -> dict:
    """Exact match per task, blank kind and decoder (A3 greedy in three orders; the pretrained LLaMA's
    greedy prefix-only continuation), with chance, the count and `show` samples per task and kind."""
    from a3jax.decode import DecodeSpec

    fills = {o: a3_fill(cfg, params, tok, items, DecodeSpec(order=o, group_size=1,
                                                           prompt_group_size=context_group_size))[0]
             for o in ORDERS}
    fills["prefix_only"] = prefix_fill(pre_cfg, pre_params, tok, items)
    out = {}
    for task in TASKS:
        out[task] = {}
        for kind in KINDS:
            idx = [i for i, it in enumerate(items) if it["task"] == task and it["kind"] == kind]
            if not idx:
                continue
            sel = [items[i] for i in idx]
            out[task][kind] = dict(
                exact_match={o: exact(sel, [fills[o][i] for i in idx]) for o in DECODERS},
                chance=float(np.mean([chance(task, _answer(it, it["text"])) for it in sel])), count=len(idx),
                samples=[dict(text=items[i]["text"], answer=_answer(items[i], items[i]["text"]),
                              **{o: _answer(items[i], fills[o][i]) for o in DECODERS}) for i in idx[:show]])
    return out


def parallel_settings(all_at_once: int):
    """(name, DecodeSpec kwargs): 1, 2 and all blanks per step (confidence order), the confidence
    threshold, self-speculative decoding (left to right, exactly token-by-token's answers)."""
    return [("group:1", dict(order="confidence", group_size=1)),
            ("group:2", dict(order="confidence", group_size=2)),
            ("all_at_once", dict(order="confidence", group_size=all_at_once)),
            ("threshold:0.9", dict(order="confidence", group_size=1, threshold=0.9)),
            ("speculative:4", dict(order="left_to_right", speculative=4))]


def parallel_section(cfg, params, tok, items, both, context_group_size: int, settings=None) -> dict:
    """Multi-token answers decoded with fewer passes, sampled at temperature 1 (one batch, one compile
    per setting): exact match and passes per answer on the right-context blanks with a multi-token
    answer, and on `both` items the share whose halves agree (they do only if the decoder conditions
    one half on the other). settings: names to run (default all of parallel_settings)."""
    from a3jax.decode import DecodeSpec, SamplingParams

    multi = [it for it in items if it["kind"] == "right_context" and it["end"] - it["start"] > 1]
    batch = multi + both
    widest = max(sum(b - a for a, b in _spans(it)) for it in batch)
    out = {}
    for name, kw in parallel_settings(widest):
        if settings is not None and name not in settings:
            continue
        spec = DecodeSpec(prompt_group_size=context_group_size, **kw)
        filled, passes = a3_fill(cfg, params, tok, batch, spec, SamplingParams(temperature=1.0, seed=0))
        m, b = slice(0, len(multi)), slice(len(multi), len(batch))
        out[name] = dict(exact_match=exact(multi, filled[m]), passes=float(np.mean(passes[m])),
                         tokens=float(np.mean([it["end"] - it["start"] for it in multi])), count=len(multi),
                         both=dict(consistent=float(np.mean([consistent(it, f) for it, f in zip(both, filled[b])])),
                                   passes=float(np.mean(passes[b])), tokens=2 * MIRROR_BLANK, count=len(both)))
    return out


def plot_parallel(par: dict, out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from a3jax.train.plot import save_png

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in par.items():
        for ax, x, y in ((axes[0], r["passes"], r["exact_match"]), (axes[1], r["both"]["passes"],
                                                                     r["both"]["consistent"])):
            ax.scatter(x, y, s=30)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set(xlabel="model passes per answer", ylabel="exact match",
                title="right-context answers (mirror, tag)")
    axes[1].set(xlabel="model passes per answer", ylabel="both halves agree",
                title="mirror, both halves blanked (sampled)")
    for ax in axes:
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    return save_png(fig, out)
