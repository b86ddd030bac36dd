"""The post-training demonstration (docs/post-training.md): a verifiable synthetic task, SFT of a tiny
model from scratch, then GRPO, on a laptop.

Task: reverse a string of 3-6 letters from a 10-letter alphabet, `rev:abcd=` -> `dcba`; the reward is
exact match. Arms (same task, same RL budget):

    sft           the SFT models alone (A3: configs/sft/reverse.yaml; mdlm: configs/sft/reverse-mdlm.yaml)
    a3-k1         exact GRPO, rollouts decoded token by token (configs/rl/reverse.yaml)
    a3-k4         exact GRPO, rollouts decoded 4 tokens per step in parallel (decode.group_size=4)
    mdlm          GRPO with diffu-GRPO's one-step estimate on the mdlm model (configs/rl/reverse-mdlm.yaml)

Every model is evaluated with greedy decoding on held-out strings: A3 token by token (k=1) and 4
tokens per step (k=4), mdlm with its own decoder. Writes OUT/demo.json, OUT/demo.md (the table) and
OUT/demo.png (eval accuracy and rollout reward against RL steps).

`--task pairs` is a task with several correct answers per prompt, where the tokens of one answer depend
on each other: `sum:7=` -> any `a+b` of two digits summing to 7 (prompts 1..17), SFT data uniform over
the valid pairs, reward 1.0 iff the completion is one of them (`any_answer`). Token by token the model
stays consistent; decoding the answer as one parallel group picks each digit independently and can mix
two answers (`3+5` and `5+3` give `3+3`). Arms: sft, a3-k1, a3-k4 (configs/sft/pairs.yaml,
configs/rl/pairs.yaml); SFT runs its whole schedule (the parallel groups are part of it).

    python -m a3jax.posttrain.demo [--task reverse|pairs] [--out runs/posttrain] [--data-only] [--rl-steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

ALPHABET = "abcdefghij"
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def make_data(out: str, seed: int = 0, n_sft: int = 4000, n_rl: int = 1000, n_eval: int = 256) -> dict:
    """sft.jsonl (prompt, response), rl.jsonl and eval.jsonl (prompt, answer); eval strings never occur
    in the SFT or RL sets."""
    rng = np.random.default_rng(seed)
    seen, rows = set(), []
    while len(rows) < n_sft + n_rl + n_eval:
        w = "".join(rng.choice(list(ALPHABET), int(rng.integers(3, 7))))
        if w not in seen:
            seen.add(w)
            rows.append(w)
    os.makedirs(out, exist_ok=True)
    paths = {}
    for name, part, key in (("sft", rows[:n_sft], "response"), ("rl", rows[n_sft:n_sft + n_rl], "answer"),
                            ("eval", rows[n_sft + n_rl:], "answer")):
        paths[name] = os.path.join(out, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps({"prompt": f"rev:{w}=", key: w[::-1]}) + "\n" for w in part)
    return paths


def make_pairs(out: str, seed: int = 0, n_sft: int = 4000, low: int = 1, high: int = 17) -> dict:
    """sft.jsonl (prompt, response: a pair drawn uniformly from the target's valid pairs); rl.jsonl and
    eval.jsonl: every target once, with all its valid answers (`answers`). The prompts are the targets
    themselves, so there is nothing held out: the question is whether the model stays consistent."""
    rng = np.random.default_rng(seed)
    valid = {n: pair_answers(n) for n in range(low, high + 1)}
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("sft", "rl", "eval")}
    with open(paths["sft"], "w") as f:
        for _ in range(n_sft):
            n = int(rng.integers(low, high + 1))
            f.write(json.dumps({"prompt": f"sum:{n}=", "response": valid[n][int(rng.integers(len(valid[n])))]}) + "\n")
    for k in ("rl", "eval"):
        with open(paths[k], "w") as f:
            f.writelines(json.dumps({"prompt": f"sum:{n}=", "answers": valid[n]}) + "\n" for n in valid)
    return paths


def pair_answers(n: int) -> list:
    """Every `a+b` of two digits with a + b = n."""
    return [f"{a}+{n - a}" for a in range(10) if 0 <= n - a <= 9]


def any_answer(completion: str, example: dict, field: str = "answers") -> float:
    """1.0 if the completion's first line, stripped, is one of example[field] (a list), else 0.0: exact
    match against any of several correct answers."""
    if not isinstance(example.get(field), list):
        raise KeyError(f"the example has no list field {field!r} (any_answer compares with its items)")
    return float(completion.split("\n", 1)[0].strip() in {str(x).strip() for x in example[field]})


LOW, HIGH = 0.15, 0.75  # the SFT level the demonstration wants: RL has room to improve, and signal


def _stops(total: int, checks: int) -> list:
    """Where SFT checks its accuracy: `checks` evenly spaced steps ending at total."""
    return sorted({max(1, round(total * (i + 1) / checks)) for i in range(checks)})


# per task: data, SFT configs (by model kind), RL configs (by arm), the SFT band (None: the whole
# schedule), the reward, the eval's decoding budget, the default arms
TASKS = {
    "reverse": dict(data=make_data, sft={"a3": "sft/reverse.yaml", "mdlm": "sft/reverse-mdlm.yaml"},
                    rl={"a3": "rl/reverse.yaml", "mdlm": "rl/reverse-mdlm.yaml"}, band=(LOW, HIGH),
                    reward=("exact_match", {"field": "answer"}), max_new_tokens=8, arms="sft,a3-k1,a3-k4,mdlm"),
    "pairs": dict(data=make_pairs, sft={"a3": "sft/pairs.yaml"}, rl={"a3": "rl/pairs.yaml"}, band=None,
                  reward=("a3jax.posttrain.demo:any_answer", {"field": "answers"}), max_new_tokens=4,
                  arms="sft,a3-k1,a3-k4"),
}


def _accuracy(ckpt: str, eval_path: str, group_size: int, order: str = "left_to_right", task: str = "reverse") -> float:
    from a3jax.checkpoint import load_params
    from a3jax.decode import DecodeSpec, text as text_lib
    from a3jax.posttrain import loop, rewards
    cfg, params = load_params(ckpt)
    tok = text_lib.load_tok("auto", ckpt)
    ex = loop.read_examples(eval_path, "prompt")
    name, args = TASKS[task]["reward"]
    rs = rewards.build([(name, 1.0, args)])
    spec = DecodeSpec(order=order, group_size=group_size)
    return loop.evaluate(cfg, params, tok, rs, ex, "prompt", spec, TASKS[task]["max_new_tokens"], 32, batch=64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m a3jax.posttrain.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/posttrain")
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--rl-steps", type=int, default=0, help="override the RL steps (0 = the configs')")
    p.add_argument("--task", choices=sorted(TASKS), default="reverse")
    p.add_argument("--arms", default="", help="comma-separated (default: all of the task's)")
    p.add_argument("--band-checks", type=int, default=16, help="SFT accuracy checks over the config's steps")
    a = p.parse_args(argv)
    task = TASKS[a.task]
    data = task["data"](os.path.join(a.out, "data"))
    if a.data_only:
        print(json.dumps(data))
        return 0
    from a3jax.config import load_config
    from a3jax.posttrain import config as rl_config, loop
    from a3jax.train.trainer import train
    arms = (a.arms or task["arms"]).split(",")
    times, curves = {}, {}
    run = lambda name: os.path.join(a.out, name)  # noqa: E731
    sft = {kind: (path, run(f"sft-{kind}"), ("left_to_right", 1) if kind == "a3" else ("confidence", 1))
           for kind, path in task["sft"].items()}
    sft_steps = {}
    for kind, (path, rd, (order, k)) in sft.items():
        if "sft" not in arms:
            continue
        cfg = load_config(os.path.join(CONFIGS, path), [f"run_dir={rd}", f"data.source={data['sft']}"])
        t0 = time.time()
        # SFT until the held-out greedy accuracy is in the band (the RL needs room on both sides), at
        # the checkpoints `stops` of the config's schedule
        band = task["band"]
        for stop in _stops(cfg.total_steps, a.band_checks) if band else [cfg.total_steps]:
            train(cfg, progress_bar=False, tensorboard=False, stop_at_step=stop)
            acc = _accuracy(rd, data["eval"], k, order, a.task)
            print(f"[demo] SFT {kind} step {stop}: greedy exact match {100 * acc:.1f}%", flush=True)
            sft_steps[kind] = dict(step=stop, accuracy=acc)
            if band and band[0] <= acc <= band[1]:
                break
        times[f"sft-{kind}"] = time.time() - t0
    rl_arms = {"a3-k1": ("a3", run("sft-a3"), []),  # init: the SFT run's last checkpoint
               "a3-k4": ("a3", run("sft-a3"), ["decode.group_size=4"]),
               "mdlm": ("mdlm", run("sft-mdlm"), [])}
    rl_arms = {n: (task["rl"][kind], init, extra) for n, (kind, init, extra) in rl_arms.items() if kind in task["rl"]}
    for name, (path, init, extra) in rl_arms.items():
        if name not in arms:
            continue
        ov = [f"init_from={init}", f"prompts={data['rl']}", f"eval_prompts={data['eval']}",
              f"run_dir={run('rl-' + name)}"] + extra + ([f"steps={a.rl_steps}"] if a.rl_steps else [])
        cfg = rl_config.load(os.path.join(CONFIGS, path), ov)
        t0 = time.time()
        loop.run(cfg)
        times[f"rl-{name}"] = time.time() - t0
    for name in rl_arms:
        mp = os.path.join(run("rl-" + name), "metrics.jsonl")
        if os.path.isfile(mp):
            curves[name] = [json.loads(ln) for ln in open(mp)]
    table = []
    for label, ckpt, kinds in (("A3 after SFT", run("sft-a3"), ("k1", "k4")),
                               ("A3 + GRPO, rollouts token by token", run("rl-a3-k1") + "/final", ("k1", "k4")),
                               ("A3 + GRPO, rollouts 4 tokens per step", run("rl-a3-k4") + "/final", ("k1", "k4")),
                               ("mdlm after SFT", run("sft-mdlm"), ("mdlm",)),
                               ("mdlm + GRPO (one-step estimate)", run("rl-mdlm") + "/final", ("mdlm",))):
        if not os.path.isdir(ckpt):
            continue
        row = {"model": label}
        for k in kinds:
            if k == "mdlm":
                row["mdlm_confidence"] = _accuracy(ckpt, data["eval"], 1, "confidence", a.task)
            else:
                row[f"a3_{k}"] = _accuracy(ckpt, data["eval"], int(k[1:]), task=a.task)
        table.append(row)
    result = dict(task=a.task, machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  date=time.strftime("%Y-%m-%d"), sft_steps=sft_steps, times_s=times, table=table, curves=curves)
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| model | greedy accuracy, k=1 | k=4 | mdlm (confidence, 1 per step) |", "|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in table:
        lines.append(f"| {r['model']} | {fmt(r.get('a3_k1'))} | {fmt(r.get('a3_k4'))} | {fmt(r.get('mdlm_confidence'))} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "demo.md"), "w") as f:
        f.write(md)
    print(md)
    _plot(curves, os.path.join(a.out, "demo.png"))
    return 0


def _plot(curves: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, recs in curves.items():
        ev = [(r["step"], r["eval_accuracy"]) for r in recs if "eval_accuracy" in r]
        if ev:
            ax1.plot(*zip(*ev), marker="o", label=name)
        rw = [(r["step"], r["reward_mean"]) for r in recs if "reward_mean" in r]
        if rw:
            ax2.plot(*zip(*rw), label=name)
    ax1.set(xlabel="RL step", ylabel="greedy accuracy, eval prompts (rollout setting)", title="eval accuracy")
    ax2.set(xlabel="RL step", ylabel="mean reward of the rollouts", title="rollout reward")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
