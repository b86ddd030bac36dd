#!/usr/bin/env bash
# One prepared check of a3jax on a single GPU (an 80 GB H100), on a host that cannot download anything:
#
#   bash bench/device_check.sh [--kernels pallas_gpu,blockwise,dense] [--batch 4] [--reference DIR]
#                              [--no-reference] [--parts tests,train,reference,decode] [--out FILE]
#   bash bench/device_check.sh --smoke      # every part on the CPU with tiny shapes (under a minute)
#
# Parts, each under its own `timeout` (a failure or a hang loses only that part; SIGINT first, so
# pytest still reports the tests it ran and bench/train.py keeps the programs it finished):
#   kernel_tests  tests/test_pallas_gpu_attention.py, the fused GPU kernel's tests (not in --smoke)
#   tests      the GPU test subset (model, masks, decoder) on the one device, fp32 matmuls at full
#              precision (JAX_DEFAULT_MATMUL_PRECISION=highest; TF32 otherwise)
#   train      bench/train.py: train-step tokens/s and MFU (two-stream FLOPs) of the LLaMA-3.2-1B shape,
#              random weights, bf16 compute, T=2048, A3 then AR for each kernel in --kernels
#   reference  bench/reference_a3.py: the reference PyTorch A3 code's training step (bf16 autocast,
#              clipping, AdamW), same GPU and shape (skipped without a copy of that code: --reference
#              DIR, default .device/reference)
#   decode     bench/decode.py --speculative: cached token-by-token and speculative (k=4) decode
#              tokens/s, 1B shape, random bf16 weights, 8 rows, 128 prompt + 128 new tokens
# --parts tests selects kernel_tests too.
# One JSON comes out: $OUT/device_check.json when OUT is set, else bench/results/device_check.json (or
# --out), with each part's status, exit code, seconds and the tail of its log; the logs and each
# part's own JSON sit beside it in device_check_logs/. Tables are printed at the end.
#
# What the host lacks travels in .device/ (`make device-bundle`): .device/wheels (installed with
# `pip install --no-index --no-deps --target .device/site-cpXY` for the host's Python, then put on
# PYTHONPATH: that works whether the host's python is a system python, a venv or conda, and keeps the
# host's jax and torch) and .device/reference. Nothing here touches the network.
#
# The 8-minute budget on one H100 (compiling one 1B-shape program takes about 30-60 s there, so the
# number of distinct programs is what costs; steps are few). Limits, the most a part may take:
#   preflight + wheel install   ~15 s
#   kernel_tests  70 s   compiled Triton kernels on small shapes
#   tests        100 s   77 tests of tiny models (87 s on a 2-core CPU); most of it is compiling
#   train        160 s   up to 6 programs (3 kernels x A3, AR) + 2 warm and 3 timed steps each; no program
#                        starts that would end past 140 s (--budget-s), in the order given, so the first
#                        kernel gets both objectives; a rerun on the same machine hits the compilation
#                        cache (.device/jax_cache) and gets through all of them
#   reference     55 s   torch eager (no compile): 2 warm + 3 timed steps
#   decode        75 s   2 programs (token-by-token, speculative), each run 3 times
#   report        ~3 s   (475 s if every part ran to its limit)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
PYTHON="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
command_line="bash bench/device_check.sh $*"

smoke=0 kernels="" batch="" reference="" no_reference=0 parts="tests,train,reference,decode" out=""
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
value() {  # value OPTION REST...: the option's argument, or a clear error
  [[ $# -ge 2 && -n "$2" ]] || { echo "device_check.sh: $1 needs a value" >&2; exit 2; }
  printf '%s' "$2"
}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --kernels) kernels="$(value "$@")" || exit 2; shift ;;
    --batch) batch="$(value "$@")" || exit 2; shift ;;
    --reference) reference="$(value "$@")" || exit 2; shift ;;
    --no-reference) no_reference=1 ;;
    --parts) parts="$(value "$@")" || exit 2; shift ;;
    --out) out="$(value "$@")" || exit 2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for p in ${parts//,/ }; do
  case "$p" in tests|train|reference|decode) ;; *)
    echo "device_check.sh: --parts: unknown part '$p' (tests, train, reference, decode)" >&2; exit 2 ;;
  esac
done
want() { [[ ",$parts," == *",$1,"* ]]; }
if [[ -n "$batch" && ! "$batch" =~ ^[1-9][0-9]*$ ]]; then
  echo "device_check.sh: --batch '$batch' is not a positive integer" >&2; exit 2
fi

if [[ -z "$out" ]]; then
  if [[ -n "${OUT:-}" ]]; then out="$OUT/device_check.json"; else out="bench/results/device_check.json"; fi
fi
logdir="$(dirname "$out")/device_check_logs"
rm -rf "$logdir"
mkdir -p "$logdir" || { echo "device_check.sh: cannot create $logdir" >&2; exit 2; }
: > "$logdir/parts.tsv"
t_start=$(date +%s)

# ---------------------------------------------------------------------------- settings per mode
cache_env=()
if [[ $smoke == 1 ]]; then
  mode=smoke
  platform=cpu
  kernels="${kernels:-dense,blockwise}"
  batch="${batch:-2}"
  t_tests=60 t_train=90 t_reference=60 t_decode=60
  test_args=(tests/test_masks.py::test_rule_rejects_unknown_stream
             tests/test_masks.py::test_block_visibility_sorted_layout_masks_only_the_diagonal)
  train_args=(--sizes small --seqs 64 --steps 2)
  ref_args=(--model tiny --seq 64 --steps 2 --device cpu)
  decode_args=(--model tiny --rows 2 --prompt-tokens 8 --new-tokens 8)
else
  mode=gpu
  platform=cuda
  kernels="${kernels:-pallas_gpu,blockwise,dense}"
  batch="${batch:-4}"
  t_kernel_tests=70 t_tests=100 t_train=160 t_reference=55 t_decode=75
  # The subset that makes sense on one GPU: no multi-device meshes (the two tests below assume the
  # 8 fake CPU devices), no torch-on-CPU parity tests (needs_torch), no libtpu (the TPU kernel's tests),
  # no real-model file, no network. The fused GPU kernel's tests run first, on their own (below).
  test_args=(tests/test_model.py tests/test_masks.py tests/test_decode.py tests/test_decode_content.py
             tests/test_decode_speculative.py
             --deselect tests/test_model.py::test_sharded_forward_on_2x4_mesh_equals_single_device
             --deselect tests/test_model.py::test_mesh_mismatch_is_a_clear_error)
  train_args=(--sizes llama3.2-1b --seqs 2048 --steps 3)
  ref_args=(--model llama3.2-1b --seq 2048 --steps 3 --device cuda)
  decode_args=(--model llama3.2-1b --rows 8 --prompt-tokens 128 --new-tokens 128)
  # A rerun on the same machine reuses the compiled 1B programs (train and decode only: the tests
  # count compilations).
  cache_env=(JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$root/.device/jax_cache}")
  # The share of the GPU's memory JAX takes (jaxlib's name; its deprecated name beside it is an error).
  [[ -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]] && export XLA_CLIENT_MEM_FRACTION="${XLA_CLIENT_MEM_FRACTION:-0.9}"
fi
[[ $no_reference == 1 ]] && reference=""
[[ $no_reference == 0 && -z "$reference" && -d .device/reference ]] && reference=.device/reference

# ---------------------------------------------------------------------------- preflight
say() { echo "[device_check] $*" >&2; }
report() {
  "$PYTHON" bench/device_report.py --logdir "$logdir" --out "$out" --mode "$mode" --command "$command_line" \
    --kernels "$kernels" --batch "$batch"
}
fail_preflight() {
  local why="$*"
  why="${why//$'\n'/ }"
  say "PREFLIGHT FAILED: $why"
  printf 'preflight\t2\t\t\t%s\n' "${why//$'\t'/ }" >> "$logdir/parts.tsv"
  report 2>/dev/null || true
  exit 2
}
command -v "$PYTHON" > /dev/null || fail_preflight "no python: '$PYTHON' is not on PATH (set PYTHON=...)"
command -v timeout > /dev/null || fail_preflight "no 'timeout' command (coreutils)"
for f in bench/train.py bench/decode.py bench/reference_a3.py bench/device_report.py tests/conftest.py; do
  [[ -f "$f" ]] || fail_preflight "missing $f: run from a complete a3jax checkout"
done
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export JAX_PLATFORMS="$platform"
# One device, as on the GPU host: a fake CPU device count from the caller's XLA_FLAGS goes.
XLA_FLAGS="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "${XLA_FLAGS:-}")"
export XLA_FLAGS="--xla_force_host_platform_device_count=1 ${XLA_FLAGS}"

# What each part imports that the host may lack; prints "group: missing-module" lines.
probe() {
  "$PYTHON" - <<'EOF'
import importlib
import importlib.util
# a3jax's own imports are imported (that finds what they need in turn); the rest only looked up.
try:
    for m in ("a3jax.train.step", "a3jax.decode", "a3jax.score"):
        importlib.import_module(m)
except ImportError as e:
    print(f"a3jax: {e.name or m}")
for group, mods in {"tests": ["pytest", "hypothesis", "scipy"], "reference": ["torch", "transformers"]}.items():
    lacking = [m for m in mods if importlib.util.find_spec(m) is None]
    if lacking:
        print(f"{group}: {lacking[0]}")
EOF
}
missing="$(probe 2>"$logdir/preflight.log")" || fail_preflight "python failed: $(tail -c 400 "$logdir/preflight.log")"
if grep -qv '^reference:' <<< "$missing" && [[ -n "$missing" ]]; then
  # The bundle holds wheels for several Pythons: this interpreter's, and those for any Python.
  tag="$("$PYTHON" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"
  wheels=() others=() have_tag=0
  for w in .device/wheels/*.whl; do
    [[ -e "$w" ]] || continue
    w_tag="$(basename "$w" | cut -d- -f3)"
    if [[ "$w_tag" == cp* && "$w_tag" != "$tag" ]]; then others+=("$w_tag"); else wheels+=("$w"); fi
    [[ "$w_tag" == "$tag" ]] && have_tag=1
  done
  if [[ ${#others[@]} -gt 0 && $have_tag == 0 ]]; then
    fail_preflight ".device/wheels has wheels for $(printf '%s\n' "${others[@]}" | sort -u | tr '\n' ' ')but not for this python ($tag): run DEVICE_PYTHON_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') make device-bundle ... and carry .device/ again"
  fi
  if [[ ${#wheels[@]} -gt 0 ]]; then
    say "missing on this host: ${missing//$'\n'/, }; installing ${#wheels[@]} wheels from .device/wheels (no network)"
    # Installed afresh on every run that needs it, into a folder named after this interpreter: a
    # folder left by another Python (compiled wheels of another version) is never put on the path.
    site=".device/site-$tag"
    rm -rf "$site"
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then
      "$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$site" \
        "${wheels[@]}" >> "$logdir/preflight.log" 2>&1 || fail_preflight "pip install from .device/wheels failed: $(tail -c 400 "$logdir/preflight.log")"
    else  # no pip: a wheel is a zip of what goes into site-packages
      "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$site" "${wheels[@]}" || fail_preflight "unpacking .device/wheels failed"
    fi
    export PYTHONPATH="$PYTHONPATH:$root/$site"
    missing="$(probe 2>>"$logdir/preflight.log")"
  else
    say "missing on this host: ${missing//$'\n'/, }; no .device/wheels to install from (run 'make device-bundle' on a machine with network, then carry .device/)"
  fi
fi
echo "$missing" > "$logdir/missing.txt"
if grep -q '^a3jax:' <<< "$missing"; then
  fail_preflight "a3jax cannot be imported here: missing module $(grep '^a3jax:' <<< "$missing" | cut -d' ' -f2) (not in .device/wheels either)"
fi
"$PYTHON" - > "$logdir/device.txt" 2>>"$logdir/preflight.log" <<'EOF' || fail_preflight "$(tail -n 1 "$logdir/preflight.log")"
import importlib.metadata, os, sys
import jax
try:
    d = jax.devices()[0]
except Exception as e:  # noqa: BLE001 (the message names what is there instead)
    plugins = sorted(x.metadata["Name"] for x in importlib.metadata.distributions()
                     if (x.metadata["Name"] or "").startswith(("jax-cuda", "jax_cuda")))
    print(f"JAX {jax.__version__} sees no {os.environ['JAX_PLATFORMS']!r} device (CUDA plugins installed: "
          f"{', '.join(plugins) or 'none'}): {type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr)
    sys.exit(1)
print(f"{jax.device_count()} x {d.device_kind} ({d.platform}), jax {jax.__version__}")
EOF
say "device: $(cat "$logdir/device.txt")"
if [[ -n "$reference" && ! -f "$reference/llama_xlnet.py" ]]; then
  fail_preflight "--reference $reference: no llama_xlnet.py there (a copy of the reference A3 repository is expected; make device-bundle REFERENCE=... puts one in .device/reference)"
fi

# ---------------------------------------------------------------------------- the parts
# run_part NAME SECONDS CMD...: runs CMD under `timeout`, its output in NAME.log; records rc and seconds.
run_part() {
  local name="$1" limit="$2" t0 ms rc
  shift 2
  say "$name: up to ${limit} s ..."
  t0=$(date +%s%N)
  # SIGINT first: pytest then still writes its report of the tests it ran, bench/train.py has written
  # its JSON after every program; whatever ignores it is killed 10 s later.
  timeout -s INT -k 10 "$limit" "$@" > "$logdir/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$ms" "$limit" >> "$logdir/parts.tsv"
  say "$name: exit $rc after $((ms / 1000)) s"
}
skip_part() { printf '%s\t\t\t\tskipped: %s\n' "$1" "$2" >> "$logdir/parts.tsv"; say "$1: skipped: $2"; }

# run_tests NAME SECONDS PYTEST-ARGS...: the GPU test subset's settings. XLA_FLAGS' device count of 1
# stops conftest from adding 8 fake CPU devices; on the GPU the XLA optimisation level is the
# compiler's default (3), not the CPU suite's compile-time saving 0.
run_tests() {
  local name="$1" limit="$2" flags="$XLA_FLAGS" platforms=cpu
  shift 2
  if grep -q '^tests:' <<< "$missing"; then
    skip_part "$name" "missing module $(grep '^tests:' <<< "$missing" | cut -d' ' -f2)"
    return
  fi
  [[ $smoke == 0 ]] && flags="$flags --xla_backend_optimization_level=3"
  [[ $platform == cuda ]] && platforms="cuda,cpu"
  JAX_PLATFORMS="$platforms" XLA_FLAGS="$flags" JAX_DEFAULT_MATMUL_PRECISION=highest \
    run_part "$name" "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider -m "not needs_torch" \
    --junitxml="$logdir/$name.xml" "$@"
}

# The fused GPU kernel's tests first, in their own run (the suite's conftest orders modules heaviest
# first, which would put them last and a timeout would cut them).
if want tests && [[ $smoke == 0 ]]; then
  if [[ -f tests/test_pallas_gpu_attention.py ]]; then
    # Its cases that run sharded over two devices (SHARDED in tests/attention_cases.py) need a second GPU.
    sharded="$("$PYTHON" - 2>/dev/null <<'EOF'
import ast
for node in ast.parse(open("tests/attention_cases.py").read()).body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "SHARDED" for t in node.targets):
        print(" or ".join(sorted(ast.literal_eval(node.value))))
EOF
)"
    kernel_args=(tests/test_pallas_gpu_attention.py)
    [[ -n "$sharded" ]] && kernel_args+=(-k "not ($sharded)")
    run_tests kernel_tests "$t_kernel_tests" "${kernel_args[@]}"
  else
    skip_part kernel_tests "no tests/test_pallas_gpu_attention.py"
  fi
fi
if want tests; then
  run_tests tests "$t_tests" "${test_args[@]}"
fi
if want train; then
  run_part train "$t_train" env "${cache_env[@]}" "$PYTHON" bench/train.py "${train_args[@]}" --batch "$batch" --kernels "$kernels" \
    --budget-s $((t_train - 20)) --out "$logdir/train.json"
fi
if want reference; then
  if [[ -z "$reference" ]]; then
    skip_part reference "no reference dir"
  elif grep -q '^reference:' <<< "$missing"; then
    skip_part reference "missing module $(grep '^reference:' <<< "$missing" | cut -d' ' -f2)"
  else
    run_part reference "$t_reference" "$PYTHON" bench/reference_a3.py --reference "$reference" "${ref_args[@]}" \
      --batch "$batch" --autocast bfloat16 --optimizer --out "$logdir/reference.json"
  fi
fi
if want decode; then
  run_part decode "$t_decode" env "${cache_env[@]}" "$PYTHON" bench/decode.py --speculative "${decode_args[@]}" --param-dtype bfloat16 \
    --ks 4 --methods token-by-token speculative --temperatures 0.0 --no-nll --out "$logdir/decode.json"
fi

say "all parts done after $(( $(date +%s) - t_start )) s"
report
