#!/usr/bin/env bash
# Runs N a3jax processes on this machine (127.0.0.1), each with fake CPU devices, joined through the
# same a3jax.distributed.initialize() path as a TPU pod or a SLURM job: the way to test pod behaviour
# (global mesh, per-process data shards, Orbax writes from every process, resume) on a laptop.
#
#   launch/local.sh [--devices D] [--port P] [--log-dir DIR] [--python PY] [--command CMD] [--dry-run]
#                   N CONFIG [key=value ...] [-- extra a3jax args]
#
#   --devices D    fake CPU devices per process (default 2; the global mesh has N*D devices); the
#                  caller's other XLA_FLAGS are passed on
#   --port P       coordinator port on 127.0.0.1 (default: a free port)
#   --log-dir DIR  where process I writes DIR/process_I.log (default: a new directory under /tmp);
#                  process 0's output is also streamed here
#   --python PY    interpreter (default: $A3JAX_PYTHON, else .venv/bin/python if present, else python3)
#   --command CMD  a3jax command to run (default: train)
#   --dry-run      print every command and exit
#
# Arguments after CONFIG are passed to `a3jax CMD CONFIG ...` unchanged (overrides and flags such
# as --no-progress or --stop-at-step N). Ctrl-C / SIGTERM is forwarded to every process (the trainer
# saves a checkpoint and exits). If one process fails, the others are stopped; the exit status is
# the first non-zero one.
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }

devices=2
port=""
log_dir=""
command_name=train
dry_run=0
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${A3JAX_PYTHON:-}"
if [[ -z "$python_bin" ]]; then
  if [[ -x "$repo_root/.venv/bin/python" ]]; then python_bin="$repo_root/.venv/bin/python"; else python_bin=python3; fi
fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --log-dir) log_dir="$2"; shift 2 ;;
    --python) python_bin="$2"; shift 2 ;;
    --command) command_name="$2"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "local.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "local.sh: need N and CONFIG" >&2; usage >&2; exit 2
fi
nproc="$1"; config="$2"; shift 2
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then echo "local.sh: N must be a positive integer, got '$nproc'" >&2; exit 2; fi
if ! [[ "$devices" =~ ^[1-9][0-9]*$ ]]; then echo "local.sh: --devices must be a positive integer, got '$devices'" >&2; exit 2; fi

if [[ -z "$port" ]]; then
  if [[ "$dry_run" == 1 ]]; then
    port=PORT
  else
    port="$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
if [[ -z "$log_dir" ]]; then
  if [[ "$dry_run" == 1 ]]; then log_dir=LOG_DIR; else log_dir="$(mktemp -d /tmp/a3jax-local.XXXXXX)"; fi
fi

# The caller's other XLA flags (e.g. a lower optimisation level for quick test runs) are kept; only
# the fake device count is this script's.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g; s/  +/ /g; s/^ //; s/ $//')"
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$devices"

proc_env() {  # sets envs to the environment of process $1
  envs=("A3JAX_COORDINATOR=127.0.0.1:$port" "A3JAX_NUM_PROCESSES=$nproc" "A3JAX_PROCESS_ID=$1"
        "JAX_PLATFORMS=cpu" "XLA_FLAGS=$xla_flags")
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < nproc; i++)); do
    proc_env "$i"
    printf 'env'; printf ' %q' "${envs[@]}" "$python_bin" -m a3jax "$command_name" "$config" "$@"
    printf ' > %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  printf 'tail -f %q  # process 0\nwait\n' "$log_dir/process_0.log"
  exit 0
fi

mkdir -p "$log_dir"
echo "[local.sh] $nproc processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2
pids=()
# shellcheck disable=SC2329  # invoked by the trap
forward() {  # forwards a signal to the processes this script started
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done
}
trap 'forward TERM' INT TERM
for ((i = 0; i < nproc; i++)); do
  proc_env "$i"
  env "${envs[@]}" "$python_bin" -m a3jax "$command_name" "$config" "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
tail -n +1 -f "$log_dir/process_0.log" &
tail_pid=$!

# Poll (portable to old bash): reap finished processes; on the first failure stop the others.
status=0
running=$nproc
declare -a finished
while [[ $running -gt 0 ]]; do
  for ((i = 0; i < nproc; i++)); do
    [[ "${finished[$i]:-}" == 1 ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[i]=1
    running=$((running - 1))
    if [[ $rc != 0 && $status == 0 ]]; then
      status=$rc
      echo "[local.sh] process $i exited with status $rc; stopping the others. Last lines of its log:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2
      forward TERM
    fi
  done
  [[ $running -gt 0 ]] && sleep 0.5
done
sleep 0.3  # let tail print the last lines
kill "$tail_pid" 2>/dev/null || true
wait "$tail_pid" 2>/dev/null || true
exit "$status"
