"""`a3jax convert hf-to-a3 | a3-to-hf | reference-to-a3 | a3-to-reference | gguf-to-a3`."""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from a3jax import fs
from a3jax.checkpoint import (CheckpointError, copy_tokenizer, copy_tokenizer_files, load_params, save_params,
                              tokenizer_spec)
from a3jax.convert.gguf_io import GGUFFile, from_gguf, tensor_types
from a3jax.convert.gguf_tokenizer import write_tokenizer
from a3jax.convert.hf import ConversionError, count_params, from_hf, human_bytes, to_hf
from a3jax.convert.reference import from_reference, resolve_checkpoint_dir, to_reference

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# One line each, shown by `a3jax convert --help` and under convert in `a3jax --help`.
SUBCOMMANDS = {
    "gguf-to-a3": "GGUF file (llama.cpp) -> params checkpoint + tokenizer",
    "hf-to-a3": "HF LLaMA directory -> params checkpoint",
    "a3-to-hf": "params checkpoint or run -> HF LLaMA directory",
    "reference-to-a3": "reference A3 code checkpoint -> params checkpoint",
    "a3-to-reference": "params checkpoint -> reference A3 code format",
}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if unit not in SIZE_UNITS or not num:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(num) * SIZE_UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="a3jax convert",
        description="Convert weights between HF LLaMA / the reference A3 code and a3jax params checkpoints "
                    "(Orbax params + model.yaml). Reading is tensor by tensor, so peak host memory stays "
                    "close to one copy of the weights.")
    helps = SUBCOMMANDS  # the one-line helps `a3jax --help` shows too
    sub = ap.add_subparsers(dest="command", metavar="{" + ",".join(helps) + "}")
    sub.required = True
    dtype_help = "parameter dtype of the output (default: keep the source's)"

    p = sub.add_parser("hf-to-a3", help=helps["hf-to-a3"],
                       description="HF LLaMA directory (config.json + safetensors or pytorch_model*.bin, single "
                                   "or sharded) -> params-only Orbax checkpoint + model.yaml + tokenizer files.")
    p.add_argument("--hf", required=True, metavar="DIR", help="HF model directory")
    p.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint directory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help=dtype_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("gguf-to-a3", help=helps["gguf-to-a3"],
                       description="GGUF file of a LLaMA (general.architecture llama; any tensor type the gguf "
                                   "package dequantizes) -> params-only Orbax checkpoint + model.yaml + the "
                                   "tokenizer rebuilt from the file's metadata (tokenizer.json, "
                                   "tokenizer_config.json, special_tokens_map.json).")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file")
    p.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint directory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="parameter dtype of the output (default fp32: the "
                   "dequantized values are exact in fp32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("a3-to-hf", help=helps["a3-to-hf"],
                       description="a3jax params checkpoint -> HF LLaMA directory that transformers' "
                                   "LlamaForCausalLM.from_pretrained loads; an A3 model's query_embed goes to "
                                   "query_embed.safetensors beside it (an ar/mdlm model's was never trained: "
                                   "left out). block=llama models only.")
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="a3jax params checkpoint or training run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output HF directory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help=dtype_help)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="split model.safetensors into shards of at most SIZE (default 5GB)")

    p = sub.add_parser("reference-to-a3", help=helps["reference-to-a3"],
                       description="Reference PyTorch A3 checkpoint (HF-style config.json + state dict with "
                                   "model.query_embed [1,1,hidden]; model.safetensors, sharded safetensors, "
                                   "pytorch_model.bin or sharded .bin) -> a3jax params checkpoint with block: "
                                   "reference. DIR may be a HF Trainer output folder (its final weights, else "
                                   "the checkpoint-N with the highest N) or a checkpoint-N folder; "
                                   "optimizer.pt, scheduler.pt, rng_state.pth, training_args.bin are never "
                                   "read as weights.")
    p.add_argument("--reference", "--src", required=True, dest="src", metavar="DIR",
                   help="reference checkpoint directory, HF Trainer output folder or checkpoint-N folder")
    p.add_argument("--from-llama", action="store_true",
                   help="DIR is a plain HF LLaMA (no model.query_embed): read it into the reference block with "
                        "a N(0,1) query vector, as the reference's from_pretrained does (the start of "
                        "configs/recipe/reference.yaml)")
    p.add_argument("--out", required=True, metavar="CKPT", help="output checkpoint directory")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help=dtype_help)
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("a3-to-reference", help=helps["a3-to-reference"],
                       description="a3jax params checkpoint with block: reference -> the reference code's "
                                   "config.json + state dict (model.query_embed [1,1,hidden], HF LLaMA names).")
    p.add_argument("--ckpt", required=True, metavar="CKPT", help="a3jax params checkpoint or training run directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--format", choices=("safetensors", "bin"), default="safetensors", help="state dict file format")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help=dtype_help)
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), metavar="SIZE",
                   help="safetensors shard size (default 5GB)")
    return ap


def _summary(action: str, cfg, params, seconds: float, out: str, extra: str = "") -> None:
    n = count_params(params)
    nbytes = sum(int(x.size) * x.dtype.itemsize for x in _leaves(params))
    print(f"{action}: {n:,} parameters ({n / 1e9:.3f} B), {cfg.param_dtype}, {human_bytes(nbytes)}, "
          f"block={cfg.block}, {seconds:.1f} s -> {out}{extra}")


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def local_input(path: str) -> str:
    """The readers need local files (safetensors memory-maps them, torch.load, gguf): a gs:// input is
    copied to the host's cache first (a3jax.fs.local_copy); a local one is used where it is."""
    if fs.is_gcs(path) and not fs.exists(path):
        raise ConversionError(f"{path}: not found")
    return fs.local_copy(path)


def _to_a3(args, reference: bool) -> int:
    item = fs.join(args.out, "params")
    if fs.exists(item) and not args.force:
        raise CheckpointError(f"{item}: already exists (pass --force to overwrite)")
    t0 = time.perf_counter()
    src = root = local_input(args.src if reference else args.hf)
    if reference:
        # a HF Trainer output folder -> the folder with the weights (its top, or the newest checkpoint-N)
        src = resolve_checkpoint_dir(root, log=lambda m: print(m, file=sys.stderr))
        cfg, params = from_reference(src, dtype=args.dtype, progress=not args.no_progress, from_llama=args.from_llama)
    else:
        cfg, params = from_hf(src, dtype=args.dtype, progress=not args.no_progress)
    t_read = time.perf_counter() - t0
    save_params(args.out, cfg, params, force=args.force)  # Orbax writes gs:// itself
    # Trainer saves the tokenizer in each checkpoint-N when it has one; else the run's top folder may
    copied = copy_tokenizer_files(src, args.out) or (copy_tokenizer_files(root, args.out) if root != src else [])
    secs = time.perf_counter() - t0
    _summary("reference-to-a3" if reference else "hf-to-a3", cfg, params, secs, args.out,
             f" (read {t_read:.1f} s, write {secs - t_read:.1f} s; tokenizer files: {', '.join(copied) or 'none'})")
    return 0


def _gguf_to_a3(args) -> int:
    item = fs.join(args.out, "params")
    if fs.exists(item) and not args.force:
        raise CheckpointError(f"{item}: already exists (pass --force to overwrite)")
    t0 = time.perf_counter()
    g = GGUFFile(local_input(args.gguf))  # parsed once: tokenizer and types first (from_gguf drops the metadata)
    types = ", ".join(f"{n} {k}" for k, n in sorted(tensor_types(g).items()))
    tmp = tempfile.mkdtemp(prefix="a3jax-tokenizer-")
    try:
        written = write_tokenizer(g, tmp)  # before any params are written: a refused tokenizer leaves nothing
        cfg, params = from_gguf(g, dtype=args.dtype, progress=not args.no_progress)
        t_read = time.perf_counter() - t0
        save_params(args.out, cfg, params, force=args.force)  # Orbax writes gs:// itself
        fs.upload_dir(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary directory
    secs = time.perf_counter() - t0
    _summary("gguf-to-a3", cfg, params, secs, args.out,
             f" (read + dequantize + tokenizer {t_read:.1f} s, write {secs - t_read:.1f} s; tensors: {types}; "
             f"tokenizer files: {', '.join(written)})")
    return 0


def _from_a3(args, reference: bool) -> int:
    t0 = time.perf_counter()
    cfg, params = load_params(args.ckpt, host=True)  # numpy: one host copy, written tensor by tensor
    # the writers write local files: a gs:// --out is written to a temporary directory, then uploaded
    out = tempfile.mkdtemp(prefix="a3jax-convert-") if fs.is_gcs(args.out) else args.out
    if reference:
        to_reference(cfg, params, out, fmt=args.format, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    else:
        to_hf(cfg, params, out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    copy_tokenizer(tokenizer_spec(args.ckpt), out)  # a run directory's is its training tokenizer
    if out != args.out:
        fs.upload_dir(out, args.out)
        shutil.rmtree(out)  # our own temporary directory
    _summary("a3-to-reference" if reference else "a3-to-hf", cfg, params, time.perf_counter() - t0, args.out)
    return 0


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-a3":
            return _to_a3(args, reference=False)
        if args.command == "reference-to-a3":
            return _to_a3(args, reference=True)
        if args.command == "gguf-to-a3":
            return _gguf_to_a3(args)
        if args.command == "a3-to-hf":
            return _from_a3(args, reference=False)
        return _from_a3(args, reference=True)
    except (ConversionError, CheckpointError, FileNotFoundError, fs.StorageError) as e:
        print(f"a3jax convert {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
