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
