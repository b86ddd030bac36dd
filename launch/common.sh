#!/usr/bin/env bash
# Sourced by the launch scripts: shell quoting and the dry-run-aware command runner.
set -euo pipefail
: "${dry_run:=0}"

# q WORD: WORD quoted for a POSIX shell ('...' unless it is plain).
q() {
  if [[ "$1" =~ ^[A-Za-z0-9_./=:,@+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# run CMD...: print it, copy-pastable (when dry_run=1), or run it.
run() {
  if [[ "$dry_run" == 1 ]]; then
    local first=1 word
    for word in "$@"; do
      [[ $first == 1 ]] || printf ' '
      first=0
      q "$word"
    done
    printf '\n'
  else
    "$@"
  fi
}

# with_run_dir SCRIPT CONFIG BUCKET ARG...: sets run_args to the ARGs, plus
# run_dir=gs://BUCKET/runs/<config name> when none of them is a run_dir= override. Every worker must
# see the run directory, so with neither the script stops here.
with_run_dir() {
  local script="$1" config="$2" bucket="$3" a name
  shift 3
  run_args=("$@")
  for a in "$@"; do [[ "$a" == run_dir=* ]] && return 0; done
  if [[ -z "$bucket" ]]; then
    echo "$script: no run directory: pass --bucket BUCKET (run_dir=gs://BUCKET/runs/NAME) or run_dir=gs://BUCKET/PATH" >&2
    exit 2
  fi
  name="$(basename "$config")"; name="${name%.yaml}"; name="${name%.yml}"
  run_args+=("run_dir=gs://$bucket/runs/$name")
}
