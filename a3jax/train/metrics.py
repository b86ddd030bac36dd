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
    train FLOPs per token = 3 * fwd.

MFU = (train FLOPs per token * tokens per second) / (peak FLOP/s per device * number of devices).
The peak is `train.peak_flops_per_device` when set, else looked up from PEAK_FLOPS by the device kind
(dense bf16 numbers from the vendors' data sheets); unknown chips (e.g. CPUs) give no MFU.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

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


def forward_flops_per_token(mcfg, seq_len: int, stream: str = "a3") -> float:
    E, L, H, K, D, M, V = (mcfg.hidden_size, mcfg.num_layers, mcfg.num_heads, mcfg.num_kv_heads,
                           mcfg.head_size, mcfg.intermediate_size, mcfg.vocab_size)
    p_q = p_o = E * H * D
    p_kv = 2 * E * K * D
    p_mlp = 3 * E * M
    attn = 2 * seq_len * H * D
    head = 2 * E * V
    if stream == "ar":
        return L * (2 * (p_q + p_kv + p_o + p_mlp) + attn) + head
    if stream == "a3":
        rest = 2 * (p_q + p_o + p_mlp) + attn
        return L * 2 * p_kv + (L - 1) * rest + L * rest + head
    raise ValueError(f"stream must be 'a3' or 'ar', got {stream!r}")


def train_flops_per_token(mcfg, seq_len: int, stream: str = "a3") -> float:
    return 3.0 * forward_flops_per_token(mcfg, seq_len, stream)


class MetricsSink:
    """metrics.jsonl + TensorBoard + console; writes only on process 0 (pass enabled=False elsewhere).

    On resume from step S, metrics.jsonl lines with step > S are dropped first (those steps are run
    again), and TensorBoard events after S are purged, so a resumed run's logs read like an
    uninterrupted run's."""

    def __init__(self, run_dir: str, start_step: int, total_steps: int, enabled: bool = True,
                 tensorboard: bool = True, progress_bar: Optional[bool] = None):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(self.path):
            keep = []
            with open(self.path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line torn by a kill
                    if int(rec.get("step", 0)) <= start_step:
                        keep.append(json.dumps(rec))
            with open(self.path + ".tmp", "w") as f:
                f.write("".join(k + "\n" for k in keep))
            os.replace(self.path + ".tmp", self.path)
        self.file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=start_step + 1 if start_step else None)
        if progress_bar is None:
            progress_bar = sys.stderr.isatty()
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
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

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.file.close()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out
