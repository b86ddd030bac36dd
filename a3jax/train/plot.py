"""`a3jax plot RUN_DIR [--out PNG]`: training loss (overall and per curriculum stage) and the held-out
losses of every eval strategy against steps, with the stage boundaries as vertical lines, from
RUN_DIR/metrics.jsonl into RUN_DIR/loss.png (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import argparse
import io
import sys

from a3jax import fs
from a3jax.train.metrics import read_metrics


def save_png(fig, out: str) -> str:
    """Write a matplotlib figure as a PNG to out (local or gs://), close it, and return out."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    fs.write_bytes(out, buf.getvalue())
    return out


def plot_run(run_dir: str, out: str | None = None) -> str:
    # deferred: matplotlib is heavy and only drawing needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    if not train and not evals:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    out = out or fs.join(run_dir, "loss.png")
    fig, ax = plt.subplots(figsize=(9, 5))
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["loss"] for r in train], color="black", lw=1.5, label="train loss")
        # Per-stage curves (only where a stage had steps in the log window).
        stages = sorted({int(k) for r in train for k in r.get("stage_loss", {})})
        for st in stages:
            pts = [(r["step"], r["stage_loss"][str(st)]) for r in train if str(st) in r.get("stage_loss", {})]
            name = next((r["strategy"] for r in train if r.get("stage") == st), "")
            ax.plot(*zip(*pts), lw=0.8, alpha=0.8, label=f"train, stage {st} {name}")
        # Stage boundaries: where the logged stage changes.
        prev = train[0].get("stage")
        for r0, r1 in zip(train, train[1:]):
            if r1.get("stage") != prev:
                x = r0["step"]
                ax.axvline(x, color="gray", ls="--", lw=0.8)
                ax.text(x, 1.0, f" {r1.get('strategy', r1.get('stage'))}", transform=ax.get_xaxis_transform(),
                        va="top", ha="left", fontsize=8, color="gray")
                prev = r1.get("stage")
    for strat in sorted({k for r in evals for k in r.get("loss", {})}):
        pts = [(r["step"], r["loss"][strat]) for r in evals if strat in r.get("loss", {})]
        ax.plot(*zip(*pts), marker="o", ms=3, ls="-", lw=1.2, label=f"held-out, {strat}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(fs.basename(fs.normalize(run_dir)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, out)


def cli_main(argv) -> int:
    p = argparse.ArgumentParser(prog="a3jax plot", description=__doc__)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    a = p.parse_args(list(argv))
    try:
        path = plot_run(a.run_dir, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"a3jax plot: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
