"""Model FLOPs, MFU and the metric sinks (console, TensorBoard, metrics.jsonl).

FLOPs per token (model FLOPs: what the math needs, not what remat recomputes; one multiply-add = 2
FLOPs; training = forward + backward = 3x forward). With E hidden, L layers, H heads, Hkv kv heads,
D head dim, M MLP width, V vocab, T sequence length:

    P_q = P_o = E*H*D        P_kv = 2*E*Hkv*D        P_mlp = 3*E*M
    attention per row and layer: scores + weighted sum over the visible keys, on average T/2 of them
    (the A3 masks are block lower-triangular like the causal one): 2 * 2 * (T/2) * H*D = 2*T*H*D

    AR (content stream only, plain causal LLaMA):
        fwd = L * (2*(P_q + P_kv + P_o + P_mlp) + 2*T*H*D) + 2*E*V
    A3 (two streams; K/V come from the content stream only; the query stream has no K/V projection;
        the last layer's content update is never read, so it only computes its K/V; logits come from
        the query stream only):
        fwd = L * 2*P_kv                                   content K/V, every layer
            + (L-1) * (2*(P_q + P_o + P_mlp) + 2*T*H*D)    content Q, O, MLP, attention (layers 1..L-1)
            + L * (2*(P_q + P_o + P_mlp) + 2*T*H*D)        query stream
            + 2*E*V                                        lm_head on the query stream
    MDLM (content stream only, every position of the row in one group: attention is bidirectional,
        so every query sees all T keys):
        fwd = L * (2*(P_q + P_kv + P_o + P_mlp) + 4*T*H*D) + 2*E*V
    train FLOPs per token = 3 * fwd. Each objective's entry in a3jax.objectives owns its formula.

MFU = (train FLOPs per token * tokens per second) / (peak FLOP/s per device * number of devices).
The peak is `train.peak_flops_per_device` when set, else looked up from PEAK_FLOPS by the device kind
(dense bf16 numbers from the vendors' data sheets); unknown chips (e.g. CPUs) give no MFU.

MetricsWindow holds what the trainer logs every train.log_every steps (and saves in a checkpoint's
`progress` item); MetricsSink writes it; read_metrics reads RUN_DIR/metrics.jsonl back.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

import numpy as np
from tqdm import tqdm

from a3jax import fs, objectives

# Dense bf16 peak FLOP/s per chip (per device JAX sees). Matched by substring of device_kind, lowercase;
# longer keys are tried first.
PEAK_FLOPS = {
    "tpu v2": 45e12,
    "tpu v3": 123e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e Trillium
    "tpu v6e": 918e12,
    "tpu7x": 2307e12,
    "h200": 989e12,
    "h100 pcie": 756e12,
    "h100": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a10g": 125e12,
    "l40s": 362e12,
    "l4": 121e12,
    "v100": 125e12,
    "rtx 4090": 165e12,
}


def peak_flops_per_device(device_kind: str, override: float = 0.0) -> Optional[float]:
    if override and override > 0:
        return float(override)
    kind = device_kind.lower()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in kind:
            return PEAK_FLOPS[key]
    return None


def forward_flops_per_token(mcfg, seq_len: int, objective: str = "a3") -> float:
    """Forward FLOPs per token of what `objective`'s loss computes (its entry in a3jax.objectives)."""
    return objectives.get(objective).forward_flops(mcfg, seq_len)


def train_flops_per_token(mcfg, seq_len: int, objective: str = "a3") -> float:
    """Training FLOPs per token of `objective`: forward + backward (2x forward)."""
    return objectives.get(objective).train_flops(mcfg, seq_len)


class MetricsSink:
    """metrics.jsonl + TensorBoard + console; writes only on process 0 (pass enabled=False elsewhere).

    On resume from step S, metrics.jsonl lines with step > S are dropped first (those steps are run
    again), and TensorBoard events after S are purged, so a resumed run's logs read like an
    uninterrupted run's.

    In a gs:// run directory both files are buffered (a3jax.fs.AppendFile): written out every
    `flush_s` seconds, at every checkpoint (`flush()`) and at the end, never once per line."""

    def __init__(self, run_dir: str, start_step: int, total_steps: int, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: Optional[bool] = None, flush_s: float = 30.0):
        self.enabled = enabled
        self.path = fs.join(run_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        self.event_files: list = []
        if not enabled:
            return
        fs.makedirs(run_dir)
        keep = None
        if fs.exists(self.path):
            keep = "".join(json.dumps(rec) + "\n" for rec in read_records(self.path)
                           if int(rec.get("step", 0)) <= start_step).encode()
        self.file = fs.AppendFile(self.path, initial=keep, interval_s=flush_s)
        if tensorboard:
            # deferred: tensorboardX takes ~1.3 s to import and only runs that write TensorBoard
            # events need it (not `a3jax plot`, which reads metrics through this module)
            from tensorboardX import SummaryWriter
            from tensorboardX.record_writer import register_writer_factory

            # Our gs:// writer replaces tensorboardX's (google-cloud-storage, one upload per flush).
            register_writer_factory("gs", _EventFiles(self.event_files, flush_s))
            self.tb = SummaryWriter(fs.join(run_dir, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write((json.dumps(record) + "\n").encode())
        self.file.flush()
        if self.tb is not None:
            step = int(record["step"])
            prefix = record.get("kind", "train")
            for k, v in _flatten(record).items():
                if k in ("step", "kind", "strategy") or not isinstance(v, (int, float)) or v is None:
                    continue
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
            self.tb.flush()

    def console(self, line: str, advance: int = 0, postfix: Optional[str] = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            if advance:
                self.bar.update(advance)
            if postfix is not None:
                self.bar.set_postfix_str(postfix)
            elif line:
                self.bar.write(line)
        elif line:
            print(line, flush=True)

    def message(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def flush(self) -> None:
        """Writes out everything buffered (the trainer calls it before each checkpoint)."""
        if not self.enabled:
            return
        self.file.flush(force=True)
        if self.tb is not None:
            self.tb.flush()
            for f in self.event_files:
                f.flush(force=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


class _EventFiles:
    """tensorboardX writer factory for gs:// event files (a3jax.fs.AppendFile); remembers what it
    opened so that MetricsSink.flush can force them out."""

    def __init__(self, opened: list, flush_s: float):
        self.opened, self.flush_s = opened, flush_s

    def directory_check(self, path):  # gs:// has no directories
        pass

    def open(self, path):
        f = fs.AppendFile(path, initial=b"", interval_s=self.flush_s)
        self.opened.append(f)
        return f


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def read_records(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in order; a line torn by a kill is skipped."""
    records = []
    for line in fs.read_text(path, errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of RUN_DIR/metrics.jsonl."""
    path = fs.join(run_dir, "metrics.jsonl")
    if not fs.exists(path):
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run directory?)")
    train, evals = [], []
    for rec in read_records(path):
        (evals if rec.get("kind") == "eval" else train).append(rec)
    return train, evals


class MetricsWindow:
    """The steps since the last log line and the running totals, turned into one train record per
    log line.

    Holds the per-step metrics of the window, the window's step times (wall clock between the ends of
    consecutive steps, leaving out this process's first step, which includes the compile, and whatever
    follows `restart_clock`: eval, saving), the tokens seen and the number of skipped non-finite steps.
    `progress()` is what a run checkpoint saves; a window built from it (`progress=`) continues where
    the saved one stopped, so a resumed run logs the records an uninterrupted run logs (timings aside).
    """

    def __init__(self, tokens_per_step: int, n_devices: int = 1, flops_per_token: float = 0.0,
                 peak_flops: Optional[float] = None, start_step: int = 0, progress: Optional[dict] = None,
                 process_count: int = 1):
        progress = progress or {}
        self.tokens_per_step = int(tokens_per_step)
        self.n_devices = int(n_devices)
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.process_count = int(process_count)
        self.steps: list[dict] = list(progress.get("window", []))
        self.tokens_seen = int(progress.get("tokens_seen", start_step * self.tokens_per_step))
        self.skipped_nonfinite = int(progress.get("skipped_nonfinite", 0))
        self.step_times: list[float] = []
        self._clock = time.perf_counter()
        self._first_step = True

    def progress(self) -> dict:
        return {"window": self.steps, "tokens_seen": self.tokens_seen, "process_count": self.process_count,
                "skipped_nonfinite": self.skipped_nonfinite}

    def restart_clock(self) -> None:
        """Time from now on is step time again (call after eval or a save)."""
        self._clock = time.perf_counter()

    def add(self, step: int, stage: int, m: dict, group_size: float) -> None:
        """Step `step` (the optimizer steps done after it) finished with the host metrics `m`."""
        now = time.perf_counter()
        if not self._first_step:
            self.step_times.append(now - self._clock)
        self._first_step = False
        self._clock = now
        self.tokens_seen += self.tokens_per_step
        if int(m["nonfinite"]):
            self.skipped_nonfinite += 1
        self.steps.append({"step": step, "stage": stage, "loss": float(m["loss"]), "accuracy": float(m["accuracy"]),
                           "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]), "z_loss": float(m["z_loss"]),
                           "param_norm": float(m["param_norm"]), "nonfinite": int(m["nonfinite"]),
                           "group_size": group_size})

    def mean_loss(self) -> float:
        """Mean loss of the steps in the window (NaN when empty)."""
        return float(np.mean([w["loss"] for w in self.steps])) if self.steps else float("nan")

    def record(self, step: int, stage: int, strategy: str) -> dict:
        """The metrics.jsonl train record of the window ending at `step`; empties the window. Means
        leave out non-finite steps (unless every step was non-finite)."""
        window = self.steps
        good = [w for w in window if not w["nonfinite"]] or window
        mean = lambda key, ws=good: float(np.mean([w[key] for w in ws])) if ws else float("nan")  # noqa: E731
        stage_loss = {}
        for st in sorted({w["stage"] for w in good}):
            stage_loss[str(st)] = mean("loss", [w for w in good if w["stage"] == st])
        step_time = float(np.mean(self.step_times)) if self.step_times else None
        tps = self.tokens_per_step / step_time if step_time else None
        n_dev, peak = self.n_devices, self.peak_flops
        rec = {
            "step": step, "kind": "train", "stage": stage, "strategy": strategy,
            "loss": mean("loss"), "stage_loss": stage_loss, "accuracy": mean("accuracy"),
            "grad_norm": window[-1]["grad_norm"], "lr": window[-1]["lr"], "param_norm": window[-1]["param_norm"],
            "z_loss": mean("z_loss"), "group_size": mean("group_size", window),
            "skipped_nonfinite": self.skipped_nonfinite, "tokens_seen": self.tokens_seen,
            "step_time_s": step_time, "tokens_per_s": tps,
            "tokens_per_s_per_device": tps / n_dev if tps else None,
            "mfu": (self.flops_per_token * tps / (peak * n_dev)) if (tps and peak) else None,
        }
        self.steps = []
        self.step_times = []
        return rec


def hms(seconds: float) -> str:
    """HH:MM:SS (hours grow past 99 as needed)."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def log_line(rec: dict, total_steps: int) -> str:
    """The console line of a train record (the one a piped log gets; a terminal gets the tqdm bar). The
    ETA is the steps left at the window's mean step time (eval and saving not counted)."""
    line = (f"step {rec['step']}/{total_steps} stage {rec['stage']} ({rec['strategy']}) loss {rec['loss']:.4f} "
            f"gnorm {rec['grad_norm']:.3f} lr {rec['lr']:.2e}")
    if rec["tokens_per_s"]:
        line += f" {rec['tokens_per_s']:,.0f} tok/s {rec['step_time_s'] * 1e3:.0f} ms/step"
    if rec["mfu"] is not None:
        line += f" mfu {100 * rec['mfu']:.1f}%"
    if rec["step_time_s"]:
        line += f" eta {hms(rec['step_time_s'] * max(0, total_steps - rec['step']))}"
    return line
