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

    python -m a3jax.posttrain.demo [--out runs/posttrain] [--data-only] [--rl-steps N] [--sft-steps N]
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


LOW, HIGH = 0.15, 0.75  # the SFT level the demonstration wants: RL has room to improve, and signal


def _stops(total: int, checks: int) -> list:
    """Where SFT checks its accuracy: `checks` evenly spaced steps ending at total."""
    return sorted({max(1, round(total * (i + 1) / checks)) for i in range(checks)})


def _accuracy(ckpt: str, eval_path: str, group_size: int, order: str = "left_to_right") -> float:
    from a3jax.checkpoint import load_params
    from a3jax.decode import DecodeSpec, text as text_lib
    from a3jax.posttrain import loop, rewards
    cfg, params = load_params(ckpt)
    tok = text_lib.load_tok("auto", ckpt)
    ex = loop.read_examples(eval_path, "prompt")
    rs = rewards.build([("exact_match", 1.0, {"field": "answer"})])
    spec = DecodeSpec(order=order, group_size=group_size)
    return loop.evaluate(cfg, params, tok, rs, ex, "prompt", spec, 8, 32, batch=64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m a3jax.posttrain.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/posttrain")
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--rl-steps", type=int, default=0, help="override the RL steps (0 = the configs')")
    p.add_argument("--arms", default="sft,a3-k1,a3-k4,mdlm")
    p.add_argument("--band-checks", type=int, default=16, help="SFT accuracy checks over the config's steps")
    a = p.parse_args(argv)
    data = make_data(os.path.join(a.out, "data"))
    if a.data_only:
        print(json.dumps(data))
        return 0
    from a3jax.config import load_config
    from a3jax.posttrain import config as rl_config, loop
    from a3jax.train.trainer import train
    arms = a.arms.split(",")
    times, curves = {}, {}
    run = lambda name: os.path.join(a.out, name)  # noqa: E731
    sft = {"a3": ("sft/reverse.yaml", run("sft-a3"), ("left_to_right", 1)),
           "mdlm": ("sft/reverse-mdlm.yaml", run("sft-mdlm"), ("confidence", 1))}
    sft_steps = {}
    for kind, (path, rd, (order, k)) in sft.items():
        if "sft" not in arms:
            continue
        cfg = load_config(os.path.join(CONFIGS, path), [f"run_dir={rd}", f"data.source={data['sft']}"])
        t0 = time.time()
        # SFT until the held-out greedy accuracy is in the band (the RL needs room on both sides), at
        # the checkpoints `stops` of the config's schedule
        for stop in _stops(cfg.total_steps, a.band_checks):
            train(cfg, progress_bar=False, tensorboard=False, stop_at_step=stop)
            acc = _accuracy(rd, data["eval"], k, order)
            print(f"[demo] SFT {kind} step {stop}: greedy exact match {100 * acc:.1f}%", flush=True)
            sft_steps[kind] = dict(step=stop, accuracy=acc)
            if LOW <= acc <= HIGH:
                break
        times[f"sft-{kind}"] = time.time() - t0
    rl_arms = {"a3-k1": ("rl/reverse.yaml", run("sft-a3"), []),  # init: the SFT run's last checkpoint
               "a3-k4": ("rl/reverse.yaml", run("sft-a3"), ["decode.group_size=4"]),
               "mdlm": ("rl/reverse-mdlm.yaml", run("sft-mdlm"), [])}
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
                row["mdlm_confidence"] = _accuracy(ckpt, data["eval"], 1, "confidence")
            else:
                row[f"a3_{k}"] = _accuracy(ckpt, data["eval"], int(k[1:]))
        table.append(row)
    result = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                  date=time.strftime("%Y-%m-%d"), sft_steps=sft_steps, times_s=times, table=table, curves=curves)
    with open(os.path.join(a.out, "demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| model | greedy exact match, k=1 | k=4 | mdlm (confidence, 1 per step) |", "|---|---|---|---|"]
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
    ax1.set(xlabel="RL step", ylabel="greedy exact match (held out, rollout setting)", title="eval accuracy")
    ax2.set(xlabel="RL step", ylabel="mean reward of the rollouts", title="rollout reward")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
