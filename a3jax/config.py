"""Typed configs: YAML files plus MaxText-style `key.sub=value` overrides, validated strictly.

A config file is a YAML mapping whose top-level keys are the sections of `Config`. A section may be
given as a string naming another YAML file (e.g. `model: tiny` -> configs/model/tiny.yaml), or as a
mapping whose `base` key names one (`model: {base: tiny, block: reference}`: the file, then the keys
over it), and a file may start from another with `base: other.yaml`. Every unknown key, wrong type or
inconsistent value raises `ConfigError` naming the key and the file it came from.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional

import yaml

# The named configs ship inside the package (package data), so a wheel installed anywhere resolves
# `model=llama3.2-1b`; the checkout's top-level configs/ is a link to this directory.
CONFIG_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


class ConfigError(ValueError):
    """A config problem; the message names the key and where it came from."""


# ----------------------------------------------------------------------------- sections


def _objective(name: str):
    """The objective table's entry, or None when `name` is not an objective (a3jax.objectives; imported
    here, not at the top: the table builds on the model, which imports this module)."""
    from a3jax import objectives
    return objectives.get(name) if name in objectives.names() else None


def _objective_names() -> tuple:
    from a3jax import objectives
    return objectives.names()


@dataclass(frozen=True)
class ModelConfig:
    """A LLaMA-family A3 model. Field names follow HF's LlamaConfig where one exists."""

    vocab_size: int = 260  # vocabulary size (rows of embed and lm_head)
    hidden_size: int = 256  # model width E
    intermediate_size: int = 688  # SwiGLU MLP width M
    num_layers: int = 4  # number of two-stream blocks L
    num_heads: int = 8  # query heads H
    num_kv_heads: int = 4  # key/value heads (GQA); must divide num_heads
    head_dim: int = 0  # 0 = hidden_size // num_heads
    max_position_embeddings: int = 2048  # largest position + 1 accepted by the model (RoPE)
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head = embed^T (no separate lm_head param)
    # RoPE in HF's rotate-half layout.
    rope_theta: float = 10000.0  # RoPE base frequency
    rope_type: str = "default"  # RoPE scaling: default | linear | llama3
    rope_factor: float = 1.0  # RoPE scaling factor (linear, llama3)
    rope_low_freq_factor: float = 1.0  # llama3 RoPE low-frequency factor
    rope_high_freq_factor: float = 4.0  # llama3 RoPE high-frequency factor
    rope_original_max_position: int = 8192  # llama3 RoPE original context length
    # A3 specifics.
    block: str = "llama"  # llama (exact pre-norm LLaMA) | reference (reference code's post-norm block)
    query_init: str = "embed_mean"  # embed_mean | normal | zeros
    # Implementation.
    attention: str = "auto"  # auto | dense | blockwise | pallas (TPU) | pallas_gpu
    attention_block_size: int = 128  # query/key block size of the blockwise and pallas kernels
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of params: float32 | bfloat16 | float16
    scan_layers: bool = False  # run the layer loop as lax.scan (flat compile time in L); same params either way
    remat: str = "none"  # none | full | dots | dots_no_batch
    # Special token ids.
    bos_token_id: int = 256  # BOS id (-1 = none); kept for HF round trips and decoding
    eos_token_id: int = 257  # EOS id (-1 = none); ends a generated row
    pad_token_id: int = 258  # PAD id (-1 = none); filler for padding rows
    mask_token_id: int = -1  # MASK id of the mdlm objective (-1 = none; the byte tokenizer's is 259); never predicted
    objective: str = "a3"  # what the params are trained for (a3 | ar | mdlm): mirrors train.objective; model.yaml records it, decoders check it
    prompt_group_size: int = 0  # context layout the model was trained on, decoding's default: 0 = the whole context in one group, n = left-to-right chunks of n; training sets it from the last stage it trains when left at 0 (a3jax.data.grouping.prompt_group_size_for)
    init_from: str = ""  # params checkpoint (from `a3jax convert`; local or gs://) to start from; "" = random init
    init_std: float = 0.02  # std of the normal init of weight matrices and embeddings

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self, where: str = "model") -> None:
        def bad(key, msg):
            raise ConfigError(f"{where}.{key}: {msg}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_position_embeddings", "attention_block_size"):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.prompt_group_size < 0:
            bad("prompt_group_size", f"must be >= 0 (0 = the whole context in one group), got {self.prompt_group_size}")
        if self.head_dim == 0 and self.hidden_size % self.num_heads:
            bad("num_heads", f"{self.num_heads} does not divide hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_size % 2:
            bad("head_dim", f"RoPE needs an even head size, got {self.head_size}")
        choices = {
            "rope_type": ("default", "linear", "llama3"),
            "block": ("llama", "reference"),
            "query_init": ("embed_mean", "normal", "zeros"),
            "attention": ("auto", "dense", "blockwise", "pallas", "pallas_gpu"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16", "float16"),
            "remat": ("none", "full", "dots", "dots_no_batch"),
            "objective": _objective_names(),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"{getattr(self, key)!r} is not one of {allowed}")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id"):
            v = getattr(self, key)
            if v >= self.vocab_size:
                bad(key, f"{v} is not below vocab_size={self.vocab_size}")


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage: a grouping strategy (see a3jax.data.grouping) for a number of steps."""

    strategy: str = "ar"  # grouping strategy (docs/data.md): ar, blocks:k, random:k, mix:k:p, sizes:..., infill:...
    steps: int = 100  # optimizer steps in this stage


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib | path/glob of text files | *.jsonl | *.parquet | arrayrecord dir (local or gs://)
    text_field: str = "text"  # JSONL/Parquet field holding the text
    format: str = "text"  # text: documents (pretraining) | sft: JSONL prompt/response or chat messages, loss on the response only (docs/post-training.md)
    sft_response_pad: int = 0  # sft: pad each response with EOS to this many tokens, all targets (LLaDA's SFT: a fixed-canvas mdlm learns where to stop); 0 = one EOS
    tokenizer: str = "byte"  # byte | path (local or gs://) to a tokenizer.json or a model directory
    seq_len: int = 256  # tokens per packed row
    shuffle_seed: int = 0  # seed of the document order
    grouping_seed: int = 0  # seed of the per-example groupings (with the global example index)
    anchor_bos: bool = True  # each document's BOS alone in its first group (off: BOS grouped like any token, as the reference code)
    grouping_scope: str = "example"  # example: every example draws its own grouping | batch: one grouping per global batch, shared by its rows (the reference code; docs/curriculum.md)
    split: str = "train"  # train | heldout (stdlib: split by file)
    heldout_fraction: float = 0.05  # fraction of documents (by file for file sources) held out for eval
    worker_count: int = 0  # Grain worker processes (0 = in-process)
    prefetch: int = 2  # batches prefetched per worker
    max_documents: int = 0  # 0 = all; a cap keeps the demo's epoch short
    stages: tuple[StageConfig, ...] = (StageConfig("ar", 100),)  # the curriculum: list of {STRATEGY: STEPS}
    eval_strategies: tuple[str, ...] = ("ar", "random:4")  # groupings of the held-out eval losses


@dataclass(frozen=True)
class MeshConfig:
    # Axis sizes; the product must equal the device count.
    data: int = 1  # data-parallel axis size (-1 = the rest of the devices)
    fsdp: int = -1  # FSDP axis size: params sharded over it, batch too (-1 = the rest)
    tensor: int = 1  # tensor-parallel axis size: heads, MLP and vocab (-1 = the rest)
    # logical axis name -> mesh axes (list) or null (replicated); merged over the defaults
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp")),
        ("length", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_kv_heads", "tensor"),
        ("act_vocab", "tensor"),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("layers", None),
        ("cache_length", None),
    )


GROUPING_SCOPES = ("example", "batch")
DATA_FORMATS = ("text", "sft")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-4  # peak learning rate (AdamW)
    end_learning_rate_fraction: float = 0.1  # final lr as a fraction of the peak (cosine/linear)
    warmup_steps: int = 50  # linear warmup steps
    schedule: str = "cosine"  # cosine | linear | constant
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.01  # decoupled weight decay (matrices and embeddings; not norms, nor query_embed unless decay_query_embed)
    decay_query_embed: bool = False  # also weight-decay the query vector (HF Trainer, so the reference code, does)
    grad_clip: float = 1.0  # global-norm gradient clipping (0 = off)
    schedule_per_stage: bool = False  # restart warmup + decay at every data.stages boundary, each over its stage's steps (the reference: one Trainer run per stage)
    reset_moments_per_stage: bool = False  # zero the AdamW moments and their bias correction at every data.stages boundary (the reference: a fresh optimizer per Trainer run)

    def validate(self, where: str = "train.optimizer", stages=(), total_steps: int = 0) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}.schedule: {self.schedule!r} is not one of {SCHEDULES}")
        for key in ("learning_rate", "warmup_steps", "weight_decay", "grad_clip", "eps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be in [0, 1), got {getattr(self, key)}")
        if not 0 <= self.end_learning_rate_fraction <= 1:
            raise ConfigError(f"{where}.end_learning_rate_fraction: must be in [0, 1], got "
                              f"{self.end_learning_rate_fraction}")
        if self.schedule_per_stage and stages:
            short = [i for i, st in enumerate(stages) if st.steps <= self.warmup_steps]
            if short:
                raise ConfigError(f"{where}.schedule_per_stage: warmup_steps={self.warmup_steps} is not below the "
                                  f"steps of data.stages{short} (each stage warms up again)")
            curriculum = sum(st.steps for st in stages)
            if total_steps > curriculum:
                raise ConfigError(f"{where}.schedule_per_stage: train.steps={total_steps} runs past the "
                                  f"curriculum's {curriculum} steps, where the per-stage schedule has decayed "
                                  f"to its end; add a stage or set train.steps <= {curriculum}")


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 8  # rows per optimizer step, over all processes
    microbatches: int = 1  # gradient accumulation inside the step
    steps: int = 0  # 0 = sum of the curriculum's stage steps
    seed: int = 0  # seed of the init and the step rng
    z_loss: float = 0.0  # weight of the z-loss (log Z)^2 term
    skip_nonfinite: bool = False  # skip a step whose loss is NaN/Inf instead of stopping
    log_every: int = 10  # steps between console/metrics lines
    eval_every: int = 100  # steps between held-out evaluations (0 = only at the end)
    eval_batches: int = 4  # held-out batches per evaluation and strategy
    eval_at_start: bool = False  # also evaluate before the first step (the converted model's baseline)
    peak_flops_per_device: float = 0.0  # 0 = look up from the chip table
    objective: str = "a3"  # a3 | ar (causal LM, next-token loss) | mdlm (masked diffusion NELBO); docs/train.md
    optimizer: OptimizerConfig = OptimizerConfig()  # optimizer section


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (also saved at the end and on SIGTERM/SIGINT)
    max_to_keep: int = 3  # checkpoints kept (older ones deleted)
    async_save: bool = True  # write checkpoints in the background


@dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()  # model section (or a file name in configs/model/)
    data: DataConfig = DataConfig()  # data section (or a file name, e.g. curriculum/paper)
    mesh: MeshConfig = MeshConfig()  # device mesh section
    train: TrainConfig = TrainConfig()  # training section
    checkpoint: CheckpointConfig = CheckpointConfig()  # checkpoint section
    run_dir: str = "runs/default"  # where checkpoints, metrics and logs go: a local path or gs://BUCKET/path

    def __post_init__(self):
        # train.objective is the key users set; model.objective records it with the params. Either may
        # be given: a non-default one wins, two different non-default ones are an error (validate).
        t, m, default = self.train.objective, self.model.objective, TrainConfig.objective
        if t != m and default in (t, m):
            obj = m if t == default else t
            object.__setattr__(self, "train", dataclasses.replace(self.train, objective=obj))
            object.__setattr__(self, "model", dataclasses.replace(self.model, objective=obj))

    def validate(self, where: str = "config") -> None:
        obj = self.train.objective
        entry = _objective(obj)
        if entry is None:
            raise ConfigError(f"{where}: train.objective {obj!r} is not one of {_objective_names()}")
        self.model.validate(f"{where}: model")
        if self.model.objective != obj:
            raise ConfigError(f"{where}: train.objective={obj!r} but model.objective={self.model.objective!r}; "
                              f"set one of them (model.objective records train.objective)")
        if entry.position_order:
            # rows in position order (ar, mdlm); a grouping would permute them (data/packing.py)
            bad = [s.strategy for s in self.data.stages if s.strategy != "ar"]
            if bad:
                raise ConfigError(f"{where}: train.objective={obj!r} trains on rows in position order; "
                                  f"data.stages must all use the 'ar' strategy, got {bad} "
                                  f"(e.g. data.stages='[{{ar: 1000}}]')")
        if entry.needs_mask_token and self.model.mask_token_id < 0:
            raise ConfigError(f"{where}: train.objective={obj} needs model.mask_token_id (a token id the data "
                              f"never holds; the byte tokenizer's MASK is 259)")
        for i, st in enumerate(self.data.stages):
            if st.steps <= 0:
                raise ConfigError(f"{where}: data.stages[{i}].steps must be positive, got {st.steps}")
        if self.data.format not in DATA_FORMATS:
            raise ConfigError(f"{where}: data.format {self.data.format!r} is not one of {DATA_FORMATS}")
        if self.data.format == "sft" and self.data.grouping_scope != "example":
            raise ConfigError(f"{where}: data.format=sft groups each example's response on its own; "
                              f"data.grouping_scope must be 'example', got {self.data.grouping_scope!r}")
        if self.data.sft_response_pad < 0:
            raise ConfigError(f"{where}: data.sft_response_pad must be >= 0, got {self.data.sft_response_pad}")
        if self.data.grouping_scope not in GROUPING_SCOPES:
            raise ConfigError(f"{where}: data.grouping_scope {self.data.grouping_scope!r} is not one of "
                              f"{GROUPING_SCOPES}")
        self.train.optimizer.validate(f"{where}: train.optimizer", self.data.stages, self.total_steps)
        if self.train.global_batch_size % self.train.microbatches:
            raise ConfigError(f"{where}: train.microbatches={self.train.microbatches} does not divide "
                              f"train.global_batch_size={self.train.global_batch_size}")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"{where}: data.seq_len={self.data.seq_len} exceeds "
                              f"model.max_position_embeddings={self.model.max_position_embeddings}")

    @property
    def total_steps(self) -> int:
        return self.train.steps or sum(s.steps for s in self.data.stages)


# ----------------------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, key: str, where: str):
    """Checks/converts a YAML value to the annotated type; raises ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, where)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return build(tp, value, where, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        return tuple(_freeze(v) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: {key}: unsupported type {_type_name(tp)}")


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _freeze(x)) for k, x in v.items())
    return v


def _stage_from(value, key, where):
    # Stages may be written compactly as "strategy: steps" pairs or as {strategy, steps} mappings.
    if isinstance(value, dict) and set(value) == {"strategy", "steps"} or isinstance(value, StageConfig):
        return _coerce(value, StageConfig, key, where)
    if isinstance(value, dict) and len(value) == 1:
        (s, n), = value.items()
        return _coerce({"strategy": s, "steps": n}, StageConfig, key, where)
    raise ConfigError(f"{where}: {key} must be {{strategy: NAME, steps: N}} or {{NAME: N}}, got {value!r}")


def build(cls, values: dict, where: str = "<dict>", prefix: str = ""):
    """Builds dataclass `cls` from a (nested) dict; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"{where}: unknown key {full!r} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if cls is DataConfig and key == "stages":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where}: {full} must be a list of stages")
            kwargs[key] = tuple(_stage_from(v, f"{full}[{i}]", where) for i, v in enumerate(value))
        elif cls is MeshConfig and key == "rules":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {full} must be a mapping of logical axis -> mesh axes")
            merged = dict(MeshConfig.rules)
            merged.update({k: _freeze(v) for k, v in value.items()})
            kwargs[key] = tuple(merged.items())
        else:
            kwargs[key] = _coerce(value, tp, full, where)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """Config dataclass -> plain dict (YAML/JSON-able), inverse of `build`."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out[f.name] = to_dict(v)
        elif f.name == "stages":
            out[f.name] = [{"strategy": s.strategy, "steps": s.steps} for s in v]
        elif f.name == "rules":
            out[f.name] = {k: (list(a) if isinstance(a, tuple) else a) for k, a in v}
        elif isinstance(v, tuple):
            out[f.name] = list(v)
        else:
            out[f.name] = v
    return out


# ----------------------------------------------------------------------------- files and overrides


SECTION_FILES = ("model", "data", "mesh", "train", "checkpoint")  # sections that may name a YAML file


def parse_yaml(text: str, where: str) -> dict:
    """The one YAML reader of configs: text -> the top-level mapping; `where` (a file name) starts every
    error message."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where}: keys must be strings, got {bad[0]!r}")
    return data


def _read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        return parse_yaml(f.read(), path)


def _resolve(name: str, base_dir: str, section: str = "") -> str:
    cands = []
    for d in (base_dir, CONFIG_ROOT):
        for sub in ((section,) if section else ()) + ("",):
            for ext in ("", ".yaml", ".yml"):
                cands.append(os.path.join(d, sub, name + ext))
    for c in cands:
        if os.path.isfile(c):
            return c
    raise ConfigError(f"config file {name!r} not found (looked in {base_dir} and {CONFIG_ROOT})")


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_dict(path: str, _seen=()) -> dict:
    """Reads a config file, following `base:` and section-file references, into one merged dict."""
    path = os.path.abspath(path)
    if path in _seen:
        raise ConfigError(f"{path}: `base` chain loops")
    data = _read_yaml(path)
    base_dir = os.path.dirname(path)
    merged: dict = {}
    if "base" in data:
        merged = load_dict(_resolve(data.pop("base"), base_dir), _seen + (path,))
    for section, value in data.items():
        if isinstance(value, str) and section in SECTION_FILES:
            value = _read_yaml(_resolve(value, base_dir, section))
        elif isinstance(value, dict) and "base" in value and section in SECTION_FILES:
            # `model: {base: llama3.2-1b, block: reference}`: a section file, then keys over it
            value = dict(value)
            name = value.pop("base")
            if not isinstance(name, str):
                raise ConfigError(f"{path}: {section}.base must name a {section} file, got {name!r}")
            value = _merge(_read_yaml(_resolve(name, base_dir, section)), value)
        merged = _merge(merged, {section: value})
    return merged


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies `a.b.c=value` strings; the value is parsed as YAML (so 1e-4, true, [1,2] work)."""
    values = dict(values)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in SECTION_FILES and isinstance(val, str):
            # `model=llama3.2-1b`, `data=curriculum/paper`: a section file, merged like in a config file.
            values = _merge(values, {parts[0]: _read_yaml(_resolve(val, CONFIG_ROOT, parts[0]))})
            continue
        node = values
        for p in parts[:-1]:
            nxt = node.get(p)
            nxt = dict(nxt) if isinstance(nxt, dict) else {}
            node[p] = nxt
            node = nxt
        node[parts[-1]] = val
    return values


def split_config_args(args) -> tuple[Optional[str], list[str]]:
    """`CONFIG.yaml key=value ...` (MaxText style) -> (path or None, overrides)."""
    path, overrides = None, []
    for a in args:
        if "=" in a:
            overrides.append(a)
        elif path is None:
            path = a
        else:
            raise ConfigError(f"unexpected argument {a!r} (overrides look like key.sub=value)")
    return path, overrides


def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> Config:
    """The one entry point: file (optional) + overrides -> validated Config."""
    values = load_dict(path) if path else {}
    where = path or "<overrides>"
    if overrides:
        values = apply_overrides(values, list(overrides))
        where = f"{where} (+ overrides)"
    cfg = build(Config, values, where)
    cfg.validate(where)
    return cfg


def load_model_config(path: str) -> ModelConfig:
    cfg = build(ModelConfig, _read_yaml(path), path)
    cfg.validate(path)
    return cfg


def parse_model_config(text: str, where: str) -> ModelConfig:
    """A ModelConfig from YAML text (read by the caller from anywhere, e.g. gs://); `where` names it."""
    cfg = build(ModelConfig, parse_yaml(text, where), where)
    cfg.validate(where)
    return cfg


def yaml_text(obj) -> str:
    """The YAML that save_yaml writes (callers that write through a3jax.fs use this)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def save_yaml(obj, path: str) -> None:
    with open(path, "w") as f:
        f.write(yaml_text(obj))
