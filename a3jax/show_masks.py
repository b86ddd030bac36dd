"""`a3jax show-masks`: draw the content and query masks of a grouping, so a grouping can be seen.

    a3jax show-masks --groups "0 0 1 2 2 1" [--out masks.png]
    a3jax show-masks --strategy random:4 --length 16 [--seed 0] [--sorted]

Rows are the attending positions, columns the attended ones; both masks come from a3jax.masks.
"""
from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from a3jax import fs, masks
from a3jax.data.grouping import make_groups


def parse_groups(text: str) -> np.ndarray:
    try:
        g = np.array([int(x) for x in text.replace(",", " ").split()], np.int32)
    except ValueError as e:
        raise ValueError(f"--groups must be integers separated by spaces, got {text!r}") from e
    if g.size == 0:
        raise ValueError("--groups is empty")
    return g


def render(groups: np.ndarray, out: str, positions: np.ndarray | None = None, title: str = "") -> str:
    import matplotlib  # deferred: matplotlib is slow to import and only drawing needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = groups[None]
    s = np.ones_like(g)
    t = groups.size
    labels = [f"{p}\ng{gr}" for p, gr in zip(positions if positions is not None else range(t), groups)]
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.45 * t * 2, 1.5 + 0.4 * t), squeeze=True)
    for ax, (name, m) in zip(axes, (("content stream: g[j] <= g[i]", masks.content_mask(g, s)[0]),
                                     ("query stream: g[j] < g[i]", masks.query_mask(g, s)[0]))):
        ax.imshow(np.asarray(m, np.float32), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(t), labels, fontsize=7)
        ax.set_yticks(range(t), labels, fontsize=7)
        ax.set_xlabel("attended position j (g = group)")
        ax.set_ylabel("attending position i")
        for i in range(t):
            for j in range(t):
                if m[i, j]:
                    ax.text(j, i, "✓", ha="center", va="center", fontsize=7, color="white")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fs.basename(out).rsplit(".", 1)[-1] if "." in fs.basename(out) else "png", dpi=110)
    plt.close(fig)
    fs.write_bytes(out, buf.getvalue())  # local or gs://
    return out


def cli_main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="a3jax show-masks", description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--groups", help='group id per position, e.g. "0 0 1 2 2 1"')
    src.add_argument("--strategy", help="a grouping strategy name, e.g. ar, blocks:2, random:4")
    ap.add_argument("--length", type=int, default=12, help="sequence length for --strategy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sorted", action="store_true", help="show rows in generation order (sorted by group)")
    ap.add_argument("--out", default="masks.png")
    args = ap.parse_args(argv)
    try:
        if args.groups is not None:
            groups = parse_groups(args.groups)
            title = f"groups {args.groups}"
        else:
            if args.length <= 0:
                raise ValueError(f"--length must be positive, got {args.length}")
            groups = np.asarray(make_groups(args.strategy, args.length, np.random.default_rng(args.seed)), np.int32)
            title = f"{args.strategy}, length {args.length}, seed {args.seed}"
    except (ValueError, KeyError) as e:
        print(f"a3jax show-masks: {e}", file=sys.stderr)
        return 2
    positions = np.arange(groups.size)
    if args.sorted:
        order = np.argsort(groups, kind="stable")
        groups, positions = groups[order], positions[order]
    render(groups, args.out, positions, title)
    print(f"wrote {args.out}")
    return 0
