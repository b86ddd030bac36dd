#!/usr/bin/env bash
# Fills .device/ (ignored by git) with what bench/device_check.sh needs on a GPU host that cannot
# download anything, and that travels with the working tree:
#   .device/wheels     CPython manylinux x86_64 wheels of the packages such a host lacks, for each Python
#                      in DEVICE_PYTHON_VERSION (default "3.11 3.12 3.13": the check picks the host's)
#   .device/reference  a copy of the reference A3 code (github.com/PKU-ML/Any-order-Any-subset-AR; it
#                      has no license, so it lives only in this ignored folder, never in the project)
#
#   bash bench/device_bundle.sh [REFERENCE]     # or: make device-bundle [REFERENCE=...]
#
# REFERENCE: anything `git clone` takes (the repository's URL, a local clone or mirror), or a directory
# holding llama_xlnet.py; without it the check's reference part is skipped. PYTHON (default python3)
# runs pip. Prints the size that travels (working tree + .device/wheels + .device/reference), which
# must stay under 64 MiB, and fails above it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON="${PYTHON:-python3}"
reference="${1:-}"
limit_mib=64

# The host is assumed to have jax (with its CUDA plugin), flax, optax, orbax-checkpoint, tensorstore,
# chex, torch, transformers, tokenizers, safetensors and pytest, with their dependencies. What a3jax's
# training and decoding modules and the GPU test subset import beyond those: grain (a3jax.data, with
# array-record, cloudpickle and portpicker, which it needs and those packages do not bring) and
# hypothesis (the tests, with sortedcontainers). Versions follow the project's requirement files;
# dependencies are not resolved (--no-deps): the list above is the closure.
spec() { grep -h -E "^$1([<>=!~ ;]|$)" requirements.txt requirements-test.txt | head -n 1 | sed 's/ *#.*//'; }
packages=("$(spec grain)" "$(spec array-record)" cloudpickle portpicker "$(spec hypothesis)" "sortedcontainers>=2.1,<3")

versions="${DEVICE_PYTHON_VERSION:-3.11 3.12 3.13}"
for pyver in $versions; do
  if [[ ! "$pyver" =~ ^3\.[0-9]+$ ]]; then
    echo "device_bundle.sh: DEVICE_PYTHON_VERSION: '$pyver' is not a Python version like 3.12" >&2; exit 2
  fi
done
# installed copies a check left here are rebuilt on the host; they need not travel
rm -rf .device/wheels .device/site-*
mkdir -p .device/wheels
for pyver in $versions; do
  echo "[device_bundle] downloading ${#packages[@]} wheels for CPython $pyver manylinux x86_64: ${packages[*]}"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --abi "cp${pyver/./}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    -d .device/wheels "${packages[@]}"
done

if [[ -n "$reference" ]]; then
  rm -rf .device/reference
  if [[ -f "$reference/llama_xlnet.py" ]]; then
    mkdir -p .device/reference
    cp -r "$reference"/. .device/reference/
  else
    git clone -q "$reference" .device/reference
  fi
  rm -rf .device/reference/.git
  [[ -f .device/reference/llama_xlnet.py ]] || {
    echo "[device_bundle] REFERENCE $reference: no llama_xlnet.py in it (the reference A3 repository is expected)" >&2
    exit 1
  }
  echo "[device_bundle] reference code in .device/reference"
elif [[ ! -d .device/reference ]]; then
  echo "[device_bundle] no REFERENCE given: the check's reference part will be skipped"
fi

# What travels: the files git would see (tracked and untracked, not ignored) plus the carried folders.
if git rev-parse --git-dir > /dev/null 2>&1; then
  tree_bytes=$(git ls-files -z -c -o --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f1)
else
  tree_bytes=$(du -sb --exclude=.device --exclude=.venv --exclude=.venv312 --exclude=.git . | cut -f1)
fi
carried=(.device/wheels)
[[ -d .device/reference ]] && carried+=(.device/reference)
carried_bytes=$(du -cb "${carried[@]}" | tail -n 1 | cut -f1)
total=$((tree_bytes + carried_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "[device_bundle] working tree $(mib "$tree_bytes") + .device $(mib "$carried_bytes") = $(mib "$total") (limit ${limit_mib} MiB)"
ls -1 .device/wheels
if (( total > limit_mib * 1048576 )); then
  echo "[device_bundle] over the ${limit_mib} MiB a device machine takes" >&2
  exit 1
fi
