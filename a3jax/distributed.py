"""Multi-process setup: `initialize()` at the start of every command that runs on devices.

JAX's multi-controller SPMD is the distributed engine: one Python process per host, all running the
same program over a global mesh. `initialize()` finds out how this process fits in, from the
environment, in this order:

1. `A3JAX_DISTRIBUTED=none` forces a single process (e.g. to debug one worker of a pod by hand).
2. `A3JAX_COORDINATOR=host:port` with `A3JAX_NUM_PROCESSES` and `A3JAX_PROCESS_ID`: explicit
   (GPU clusters without SLURM, `launch/local.sh`, anything else). Optional
   `A3JAX_LOCAL_DEVICE_IDS=0,1` limits this process to some local devices.
3. SLURM (`SLURM_PROCID`, `SLURM_NTASKS` and a node list): the coordinator is the first host of
   `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` / `SLURM_NODELIST` on port `A3JAX_COORDINATOR_PORT`
   (default: derived from the job id, in 61440-65535, as JAX does). Any `A3JAX_*` variable that is
   set wins over the SLURM value. A one-task job is a single process.
4. A Cloud TPU VM (TPU chips on this host, or `A3JAX_DISTRIBUTED=tpu`): `jax.distributed.initialize()`
   without arguments; the TPU runtime discovers the pod slice (workers, coordinator) by itself.
5. Nothing of the above: a single process; JAX is not touched.

`initialize()` is idempotent (a second call returns the first call's answer) and must run before
anything else uses JAX devices. `A3JAX_INIT_TIMEOUT` (seconds, default 300) bounds the wait for the
other processes. Files that must be written once (logs, config copies) are written by
`is_main_process()`; Orbax checkpoints are written by every process (each its own shards).
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Mapping, Optional

ENV_PREFIX = "A3JAX_"

# JAX is imported only where it is used (deferred on purpose): a3jax.cli asks `tpu_chips_present()`
# before it decides JAX_PLATFORMS, which JAX reads when it is imported, and a single-process run never
# needs JAX from this module.


class DistributedError(RuntimeError):
    """The environment describes a multi-process job inconsistently; the message names the variable."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the job. mode: single | env | slurm | tpu."""

    mode: str
    coordinator: Optional[str] = None
    num_processes: int = 1
    process_id: int = 0
    local_device_ids: Optional[tuple] = None
    source: str = ""  # where the values came from, for logs and errors

    def describe(self) -> str:
        if self.mode == "single":
            return "single process"
        if self.mode == "tpu":
            return "TPU pod slice (workers discovered by the TPU runtime)"
        return (f"process {self.process_id} of {self.num_processes}, coordinator {self.coordinator} "
                f"(from {self.source})")


_PLAN: Optional[Plan] = None


# ----------------------------------------------------------------------------- environment parsing


def _int(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise DistributedError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise DistributedError(f"{name}={value} must be >= {minimum}")
    return value


def _check_address(name: str, addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"{name}={addr!r} must look like host:port (e.g. 10.0.0.2:1234)")
    return addr


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'node[007-010,012],gpu1' -> 'node007', 'a,b' -> 'a',
    'rack1-[3-4]' -> 'rack1-3' (zero padding kept)."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise DistributedError("the SLURM node list is empty")
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist)
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges, maxsplit=1)[0]
    return prefix + first


def slurm_port(env: Mapping[str, str]) -> int:
    if env.get("A3JAX_COORDINATOR_PORT"):
        return _int(env, "A3JAX_COORDINATOR_PORT", 1)
    job = env.get("SLURM_JOB_ID", "0")
    return int(job) % 4096 + 61440 if job.isdigit() else 61440


def tpu_chips_present() -> bool:
    """True on a Cloud TPU VM (TPU chips on the PCI bus or accel device files)."""
    try:
        from jax._src import hardware_utils  # deferred (see above); private, but it is how JAX decides

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        if chips:
            return True
    except Exception:  # noqa: BLE001 - any failure just means "no evidence of a TPU"
        pass
    return os.path.exists("/dev/accel0")


def plan_from_env(env: Optional[Mapping[str, str]] = None, tpu_present=None) -> Plan:
    """Decides the Plan from environment variables (pure; tested without starting anything)."""
    env = os.environ if env is None else env
    forced = env.get("A3JAX_DISTRIBUTED", "auto").strip().lower() or "auto"
    if forced not in ("auto", "none", "env", "slurm", "tpu"):
        raise DistributedError(f"A3JAX_DISTRIBUTED={forced!r} is not one of auto, none, env, slurm, tpu")
    if forced == "none":
        return Plan("single", source="A3JAX_DISTRIBUTED=none")
    local_ids = None
    if env.get("A3JAX_LOCAL_DEVICE_IDS"):
        try:
            local_ids = tuple(int(x) for x in env["A3JAX_LOCAL_DEVICE_IDS"].split(",") if x.strip())
        except ValueError:
            raise DistributedError(f"A3JAX_LOCAL_DEVICE_IDS={env['A3JAX_LOCAL_DEVICE_IDS']!r} must be "
                                   f"comma-separated integers") from None

    names = ("A3JAX_COORDINATOR", "A3JAX_NUM_PROCESSES", "A3JAX_PROCESS_ID")
    explicit = [k for k in names if env.get(k)]
    slurm = bool(env.get("SLURM_PROCID") and env.get("SLURM_NTASKS"))
    if forced == "env" or (forced == "auto" and explicit and not slurm):
        missing = [k for k in names if not env.get(k)]
        if missing:
            raise DistributedError(
                (f"{', '.join(explicit)} set but " if explicit else "A3JAX_DISTRIBUTED=env but ")
                + f"{', '.join(missing)} missing: set all of {', '.join(names)}")
        return _explicit(env, local_ids, "A3JAX_* variables")
    if forced == "slurm" and not slurm:
        raise DistributedError("A3JAX_DISTRIBUTED=slurm but SLURM_PROCID / SLURM_NTASKS are not set")
    if slurm and forced in ("auto", "slurm"):
        # SLURM values, each overridable by its A3JAX_* variable.
        merged = dict(env)
        merged["A3JAX_NUM_PROCESSES"] = env.get("A3JAX_NUM_PROCESSES") or env["SLURM_NTASKS"]
        merged["A3JAX_PROCESS_ID"] = env.get("A3JAX_PROCESS_ID") or env["SLURM_PROCID"]
        if _int(merged, "A3JAX_NUM_PROCESSES", 1) == 1:
            return Plan("single", source="SLURM job with one task")
        if not env.get("A3JAX_COORDINATOR"):
            nodes = (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                     or env.get("SLURM_NODELIST"))
            if not nodes:
                raise DistributedError("SLURM_PROCID/SLURM_NTASKS are set but no SLURM_STEP_NODELIST, "
                                       "SLURM_JOB_NODELIST or SLURM_NODELIST; set A3JAX_COORDINATOR=host:port")
            merged["A3JAX_COORDINATOR"] = f"{first_slurm_host(nodes)}:{slurm_port(env)}"
        return _explicit(merged, local_ids, "SLURM variables", mode="slurm")
    if forced == "tpu" or (tpu_present if tpu_present is not None else tpu_chips_present()):
        return Plan("tpu", source="TPU VM")
    return Plan("single", source="no distributed environment")


def _explicit(env, local_ids, source, mode="env") -> Plan:
    coord = _check_address("A3JAX_COORDINATOR", env["A3JAX_COORDINATOR"])
    n = _int(env, "A3JAX_NUM_PROCESSES", 1)
    pid = _int(env, "A3JAX_PROCESS_ID", 0)
    if pid >= n:
        raise DistributedError(f"A3JAX_PROCESS_ID={pid} is not below A3JAX_NUM_PROCESSES={n}")
    if n == 1:
        return Plan("single", source=f"{source} (one process)")
    return Plan(mode, coord, n, pid, local_ids, source)


# ----------------------------------------------------------------------------- the entry points


def initialize(env: Optional[Mapping[str, str]] = None) -> Plan:
    """Joins the multi-process job described by the environment (see the module docstring).

    Idempotent: later calls return the first call's Plan. Returns the Plan (mode single | env |
    slurm | tpu)."""
    global _PLAN
    if _PLAN is not None:
        return _PLAN
    plan = plan_from_env(env)
    if plan.mode != "single":
        import jax  # deferred (see above)

        if not _already_initialized(jax):
            timeout = int((env or os.environ).get("A3JAX_INIT_TIMEOUT", "300") or 300)
            if plan.mode == "tpu":
                jax.distributed.initialize(initialization_timeout=timeout)
            else:
                jax.distributed.initialize(
                    coordinator_address=plan.coordinator, num_processes=plan.num_processes,
                    process_id=plan.process_id,
                    local_device_ids=list(plan.local_device_ids) if plan.local_device_ids else None,
                    initialization_timeout=timeout)
    _PLAN = plan
    return plan


def _already_initialized(jax) -> bool:
    fn = getattr(jax.distributed, "is_initialized", None)
    return bool(fn()) if fn is not None else False


def is_main_process() -> bool:
    """True on process 0 (and in a single-process run): the one that writes logs and run files.
    Never starts a JAX backend by itself (safe to call before initialize())."""
    if _PLAN is not None and _PLAN.mode == "single":
        return True
    jax = sys.modules.get("jax")
    if jax is None or not _already_initialized(jax):
        return True
    return jax.process_index() == 0

