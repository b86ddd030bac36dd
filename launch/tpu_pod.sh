#!/usr/bin/env bash
# Runs `a3jax train CONFIG ...` on every worker of a Cloud TPU VM slice (one process per host; the
# workers find each other through a3jax.distributed.initialize()).
#
#   launch/tpu_pod.sh [options] CONFIG [key=value ...]
#
#   --tpu NAME           TPU VM name                                  (env TPU_NAME)
#   --zone ZONE          e.g. us-east5-a                              (env ZONE or CLOUDSDK_COMPUTE_ZONE)
#   --project PROJECT    GCP project                                  (env PROJECT or CLOUDSDK_CORE_PROJECT)
#   --accelerator-type T e.g. v5p-128, v5litepod-16; used by --create (env ACCELERATOR_TYPE)
#   --version V          TPU VM software version for --create         (env TPU_VERSION, default v2-alpha-tpuv5)
#   --create             create the TPU VM first (add --spot for a preemptible one)
#   --spot               with --create: a Spot VM
#   --skip-install       the code is already installed on the workers; just (re)start training
#   --stop               send SIGTERM to the training on every worker (it saves a checkpoint) and exit
#   --delete             delete the TPU VM and exit
#   --bucket BUCKET      GCS bucket for the run directory: run_dir=gs://BUCKET/runs/<config name>
#                        unless a run_dir=... override is given           (env A3JAX_BUCKET)
#   --remote-dir DIR     code directory on the workers (default: a3jax)
#   --dry-run            print every command instead of running it
#
# Steps: (create) -> copy this checkout (git ls-files, as a tarball) to every worker -> create a venv
# and `pip install -r requirements.txt 'jax[tpu]'` + the package on every worker -> start training
# on all workers at once in the background (log: ~/a3jax-train.log, pid: ~/a3jax-train.pid) ->
# stream worker 0's log here. Ctrl-C stops only the streaming; the run goes on (use --stop).
# The run directory is on GCS (gs://..., read and written natively by every worker; a gcsfuse or NFS
# mount every worker sees works too); rerunning the same command after a preemption resumes from the
# latest checkpoint. See docs/launch.md.
set -euo pipefail

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

tpu="${TPU_NAME:-}"
zone="${ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
project="${PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
accel="${ACCELERATOR_TYPE:-}"
version="${TPU_VERSION:-v2-alpha-tpuv5}"
remote_dir=a3jax
bucket="${A3JAX_BUCKET:-}"
create=0; spot=0; install=1; action=train; dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) tpu="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --accelerator-type) accel="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --remote-dir) remote_dir="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --skip-install) install=0; shift ;;
    --stop) action=stop; shift ;;
    --delete) action=delete; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tpu_pod.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[[ -n "$tpu" ]] || die "no TPU name: pass --tpu NAME or set TPU_NAME"
[[ -n "$zone" ]] || die "no zone: pass --zone ZONE or set ZONE"
[[ -n "$project" ]] || die "no project: pass --project PROJECT or set PROJECT"

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # q (quoting), run (dry-run aware)
tpu_args=(--zone="$zone" --project="$project")
ssh_all() { run gcloud compute tpus tpu-vm ssh "$tpu" "${tpu_args[@]}" --worker=all --command "$1"; }

case "$action" in
  stop)
    ssh_all "if [ -f ~/a3jax-train.pid ]; then kill -TERM \$(cat ~/a3jax-train.pid) 2>/dev/null || true; fi"
    exit 0 ;;
  delete)
    run gcloud compute tpus tpu-vm delete "$tpu" "${tpu_args[@]}" --quiet
    exit 0 ;;
esac

[[ $# -ge 1 ]] || die "need CONFIG (a path inside this checkout) and optional key=value overrides"
config="$1"; shift
with_run_dir tpu_pod.sh "$config" "$bucket" "$@"

if [[ "$create" == 1 ]]; then
  [[ -n "$accel" ]] || die "--create needs --accelerator-type (e.g. v5p-128) or ACCELERATOR_TYPE"
  create_cmd=(gcloud compute tpus tpu-vm create "$tpu" "${tpu_args[@]}" --accelerator-type="$accel"
              --version="$version")
  [[ "$spot" == 1 ]] && create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$install" == 1 ]]; then
  tarball="${TMPDIR:-/tmp}/a3jax-src.tgz"
  if [[ "$dry_run" == 1 ]]; then
    echo "(cd $(q "$repo_root") && git ls-files -z | xargs -0 tar czf $(q "$tarball"))"
  else
    (cd "$repo_root" && git ls-files -z | xargs -0 tar czf "$tarball")
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:a3jax-src.tgz" "${tpu_args[@]}" --worker=all
  ssh_all "set -e; mkdir -p ~/$remote_dir && tar xzf ~/a3jax-src.tgz -C ~/$remote_dir && cd ~/$remote_dir && \
python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && \
.venv/bin/pip install -q -r requirements.txt 'jax[tpu]' && .venv/bin/pip install -q --no-deps -e ."
fi

# The training command, quoted once for the remote shell.
train_cmd="cd ~/$remote_dir && nohup .venv/bin/python -m a3jax train $(q "$config")"
for arg in "${run_args[@]}"; do train_cmd+=" $(q "$arg")"; done
train_cmd+=" --no-progress > ~/a3jax-train.log 2>&1 < /dev/null & echo \$! > ~/a3jax-train.pid"
ssh_all "$train_cmd"

[[ "$dry_run" == 1 ]] || echo "[tpu_pod.sh] training started on every worker of $tpu; streaming worker 0 (Ctrl-C stops streaming only;" \
     "launch/tpu_pod.sh --tpu $tpu --zone $zone --project $project --stop ends the run)" >&2
run gcloud compute tpus tpu-vm ssh "$tpu" "${tpu_args[@]}" --worker=0 \
  --command "tail -n +1 -F ~/a3jax-train.log --pid=\$(cat ~/a3jax-train.pid)"
