#!/usr/bin/env bash
# Runs `a3jax train CONFIG ...` on TPU slices of a GKE cluster through xpk (a JobSet with one pod per
# TPU host; the pods find each other through a3jax.distributed.initialize() -> TPU discovery).
#
#   launch/xpk.sh [options] CONFIG [key=value ...]
#
#   --cluster NAME       GKE cluster created with `xpk cluster create` (env XPK_CLUSTER)
#   --workload NAME      workload name, lowercase letters, digits and '-' (default: a3jax-<user>-<time>)
#   --tpu-type T         e.g. v5p-128, v5litepod-256, v6e-256             (env TPU_TYPE)
#   --num-slices N       slices, joined over DCN (default 1)
#   --zone ZONE          (env ZONE)     --project PROJECT   (env PROJECT)
#   --docker-image IMG   a prebuilt image holding this checkout installed at /app
#   --base-docker-image IMG
#                        otherwise xpk builds an image from IMG (default python:3.11-slim) plus this
#                        checkout (--script-dir); the workload command installs the requirements
#   --bucket BUCKET      GCS bucket for the run directory: run_dir=gs://BUCKET/runs/<config name>
#                        unless a run_dir=... override is given           (env A3JAX_BUCKET)
#   --delete             delete the workload and exit
#   --dry-run            print every command instead of running it
#
# The run directory is on GCS (gs://..., read and written natively by every pod; no GCS FUSE driver
# needed; a Filestore volume works too). The pods need credentials for the bucket (the node pool's
# service account or Workload Identity). JobSet restarts the whole workload
# after a host failure or a preemption (xpk --max-restarts); every restart resumes from the latest
# checkpoint. See docs/launch.md.
set -euo pipefail

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }

cluster="${XPK_CLUSTER:-}"
tpu_type="${TPU_TYPE:-}"
zone="${ZONE:-}"
project="${PROJECT:-}"
workload="a3jax-$(id -un | tr -c 'a-z0-9\n' '-')-$(date +%m%d-%H%M)"
num_slices=1
image=""
base_image="python:3.11-slim"
action=create
bucket="${A3JAX_BUCKET:-}"
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) cluster="$2"; shift 2 ;;
    --workload) workload="$2"; shift 2 ;;
    --tpu-type) tpu_type="$2"; shift 2 ;;
    --num-slices) num_slices="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --docker-image) image="$2"; shift 2 ;;
    --base-docker-image) base_image="$2"; shift 2 ;;
    --bucket) bucket="$2"; shift 2 ;;
    --delete) action=delete; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "xpk.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done

die() { echo "xpk.sh: $*" >&2; exit 2; }
[[ -n "$cluster" ]] || die "no cluster: pass --cluster NAME or set XPK_CLUSTER"
[[ -n "$zone" ]] || die "no zone: pass --zone ZONE or set ZONE"
[[ -n "$project" ]] || die "no project: pass --project PROJECT or set PROJECT"
[[ "$workload" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--workload '$workload' must be lowercase letters, digits and '-'"

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # q (quoting), run (dry-run aware)
common=(--cluster "$cluster" --zone "$zone" --project "$project")

if [[ "$action" == delete ]]; then
  run xpk workload delete --workload "$workload" "${common[@]}"
  exit 0
fi

[[ $# -ge 1 ]] || die "need CONFIG (a path inside this checkout) and optional key=value overrides"
[[ -n "$tpu_type" ]] || die "no TPU type: pass --tpu-type (e.g. v5p-128) or set TPU_TYPE"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer"
config="$1"; shift
with_run_dir xpk.sh "$config" "$bucket" "$@"

train="python -m a3jax train $(q "$config")"
for arg in "${run_args[@]}"; do train+=" $(q "$arg")"; done
train+=" --no-progress"
# A3JAX_DISTRIBUTED=tpu: join the slice through the TPU runtime's discovery (JobSet sets the worker list).
if [[ -n "$image" ]]; then
  command="cd /app && A3JAX_DISTRIBUTED=tpu $train"
  image_args=(--docker-image "$image")
else
  command="pip install -q -r requirements.txt 'jax[tpu]' && pip install -q --no-deps -e . && A3JAX_DISTRIBUTED=tpu $train"
  repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  image_args=(--base-docker-image "$base_image" --script-dir "$repo_root")
fi

run xpk workload create --workload "$workload" "${common[@]}" --tpu-type "$tpu_type" \
  --num-slices "$num_slices" "${image_args[@]}" --max-restarts 10 --command "$command"
[[ "$dry_run" == 1 ]] || echo "[xpk.sh] logs: kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=$workload --max-log-requests 1;" \
     "status: xpk workload list ${common[*]}" >&2
