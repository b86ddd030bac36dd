"""The one path layer: every path a user gives (run_dir, checkpoints, data, tokenizers, converter
inputs and outputs, task files) is a local path or a `gs://bucket/object` URL, and every read, write
and listing of such a path goes through here (fsspec; gcsfs for gs://). Orbax and tensorstore take
the same strings directly (they speak gs:// themselves).

    from a3jax import fs
    fs.join(run_dir, "metrics.jsonl"); fs.exists(p); fs.read_text(p); fs.write_text(p, s)
    fs.find(root)                  every file below root, sorted (hidden names skipped)
    fs.glob(pattern)               sorted matches (`**` recurses, on gs:// too)
    fs.local_copy(p)               a local path holding p's bytes (p itself when local): for readers
                                   that need a real file (ArrayRecord, safetensors, tokenizers, GGUF)
    fs.AppendFile(p)               buffered appends (metrics.jsonl, TensorBoard events)

Credentials (gs://) are checked before anything touches the bucket, so a machine without them fails
within seconds with a message saying what to set rather than hanging in tensorstore's retries:
GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, a GCE/TPU VM's metadata
server, or a local emulator (STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL, both). A missing
bucket is named in the error. GCS has no rename; nothing here renames on gs://.
"""
from __future__ import annotations

import glob as _pyglob
import http.client
import json
import os
import posixpath
import shutil
import socket
import threading
import time
import urllib.parse
from typing import Iterator, Optional

import fsspec

GCS = "gs://"
# Where gs:// inputs that need a local file are copied (fs.local_copy); one copy per host.
CACHE_ENV = "A3JAX_CACHE_DIR"


class StorageError(OSError):
    """A gs:// path cannot be reached: no credentials, no emulator, or no such bucket."""


def is_gcs(path) -> bool:
    return str(path).startswith(GCS)


def normalize(path) -> str:
    """Local: absolute, `~` expanded. gs://: as given, without a trailing slash."""
    p = str(path)
    if is_gcs(p):
        return p.rstrip("/") if p.rstrip("/") != GCS.rstrip("/") else p
    return os.path.abspath(os.path.expanduser(p))


def join(base, *parts) -> str:
    base = str(base)
    if is_gcs(base):
        return posixpath.join(base.rstrip("/"), *[str(p).strip("/") for p in parts])
    return os.path.join(os.path.expanduser(base), *map(str, parts))


def dirname(path) -> str:
    p = str(path)
    if is_gcs(p):
        d = posixpath.dirname(p)
        return d if len(d) > len(GCS) else p  # the bucket is its own top
    return os.path.dirname(p)


def basename(path) -> str:
    return posixpath.basename(str(path).rstrip("/")) if is_gcs(path) else os.path.basename(str(path).rstrip(os.sep))


def relpath(path, root) -> str:
    if is_gcs(path):
        return posixpath.relpath(str(path)[len(GCS) - 1:], str(root).rstrip("/")[len(GCS) - 1:])
    return os.path.relpath(path, root)


def bucket_of(path) -> str:
    return str(path)[len(GCS):].split("/", 1)[0]


# ----------------------------------------------------------------------------- the filesystems


_LOCK = threading.Lock()
_GCS_FS = None
_CHECKED_BUCKETS: set = set()
_LOCAL = fsspec.filesystem("file")


def _tcp_reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _google_metadata_server(host_port: str, timeout: float) -> bool:
    """Whether Google's metadata server answers at host_port. Other clouds (and some container
    networks) answer on 169.254.169.254 too: only the Metadata-Flavor: Google reply counts, or the
    Google auth library would go on to look the server up by name and retry for a minute."""
    host, _, port = host_port.partition(":")
    if not _tcp_reachable(host, int(port or 80), timeout):
        return False
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=timeout)
    try:
        conn.request("GET", "/computeMetadata/v1/", headers={"Metadata-Flavor": "Google"})
        return conn.getresponse().getheader("Metadata-Flavor") == "Google"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _emulator() -> Optional[str]:
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


def check_credentials(path: str = GCS) -> None:
    """Raises StorageError within seconds when gs:// cannot work on this machine (see the module doc)."""
    emu = _emulator()
    if emu:
        if not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
            raise StorageError(
                f"{path}: STORAGE_EMULATOR_HOST={emu} is set but TENSORSTORE_GCS_HTTP_URL is not; Orbax "
                f"(tensorstore) would contact the real service. Set TENSORSTORE_GCS_HTTP_URL={emu} as well, "
                f"before the process starts")
        u = urllib.parse.urlsplit(emu if "://" in emu else "http://" + emu)
        if not _tcp_reachable(u.hostname or "127.0.0.1", u.port or 80, 3.0):
            raise StorageError(f"{path}: no GCS emulator answers at STORAGE_EMULATOR_HOST={emu}")
        return
    adc = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if adc:
        if not os.path.isfile(adc):
            raise StorageError(f"{path}: GOOGLE_APPLICATION_CREDENTIALS={adc} does not exist")
        return
    gcloud_dir = os.environ.get("CLOUDSDK_CONFIG") or os.path.expanduser("~/.config/gcloud")
    if os.path.isfile(os.path.join(gcloud_dir, "application_default_credentials.json")):
        return
    # GCE / TPU VM / GKE: the metadata server hands out the VM's service-account token.
    meta = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_IP") or "169.254.169.254"
    if _google_metadata_server(meta, 2.0):
        return
    raise StorageError(
        f"{path}: no Google Cloud credentials on this machine. Set GOOGLE_APPLICATION_CREDENTIALS to a "
        f"service-account key file, or run `gcloud auth application-default login`, or run on a GCE/TPU VM; "
        f"for a local emulator set STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL (both to its URL)")


def reset() -> None:
    """Forgets the GCS filesystem and the buckets checked (after the environment changed, e.g. tests)."""
    global _GCS_FS
    with _LOCK:
        _GCS_FS = None
        _CHECKED_BUCKETS.clear()


def _gcs(path: str = GCS):
    global _GCS_FS
    with _LOCK:
        if _GCS_FS is None:
            check_credentials(path)
            if _emulator():
                # the emulator has no hierarchical-namespace endpoint; gcsfs warns on every bucket otherwise
                os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            import gcsfs  # deferred: only gs:// paths need it (and its import costs ~0.7 s)

            # No listings cache: Orbax (tensorstore) and other hosts write behind gcsfs's back.
            _GCS_FS = gcsfs.GCSFileSystem(token="anon" if _emulator() else None, use_listings_cache=False,
                                          retries=3)
        return _GCS_FS


def _fs(path):
    """(filesystem, path in its terms) for a user path; for gs:// the bucket is checked once."""
    p = str(path)
    if not is_gcs(p):
        return _LOCAL, os.path.expanduser(p)
    g = _gcs(p)
    bucket = bucket_of(p)
    if not bucket:
        raise StorageError(f"{p}: no bucket in the URL (gs://BUCKET/path)")
    if bucket not in _CHECKED_BUCKETS:
        try:
            ok = g.exists(bucket)
        except Exception as e:  # noqa: BLE001 - a refused token, a network error: say so, with the path
            raise StorageError(f"{p}: cannot reach bucket {bucket!r} ({type(e).__name__}: {e})") from e
        if not ok:
            raise FileNotFoundError(f"{p}: GCS bucket {bucket!r} does not exist (or these credentials cannot see it)")
        _CHECKED_BUCKETS.add(bucket)
    return g, p[len(GCS):]


def _url(path) -> str:
    p = str(path)
    return p if p.startswith(GCS) else GCS + p


# ----------------------------------------------------------------------------- queries


def exists(path) -> bool:
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path) -> bool:
    fs, p = _fs(path)
    return fs.isdir(p)


def isfile(path) -> bool:
    fs, p = _fs(path)
    return fs.isfile(p)


def size(path) -> int:
    fs, p = _fs(path)
    return int(fs.size(p))


def listdir(path) -> list[str]:
    """Names (not paths) directly under a directory, sorted."""
    fs, p = _fs(path)
    if not fs.isdir(p):
        raise FileNotFoundError(f"{path}: no such directory")
    return sorted({posixpath.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)} - {""})


def find(root, exclude_dirs=frozenset(), suffix: str = "") -> list[str]:
    """Every regular file below `root` (recursively) as user paths, in os.walk order with sorted
    names (a directory's files, then its subdirectories); names starting with '.', directories in
    exclude_dirs and (with `suffix`) files not ending in it are skipped."""
    if not is_gcs(root):
        out = []
        for d, dirs, files in os.walk(os.path.expanduser(str(root))):
            dirs[:] = sorted(x for x in dirs if x not in exclude_dirs and not x.startswith("."))
            for f in sorted(files):
                p = os.path.join(d, f)
                if not f.startswith(".") and (not suffix or f.endswith(suffix)) and os.path.isfile(p):
                    out.append(p)
        return out
    fs, p = _fs(root)
    rels = []
    for f in fs.find(p):
        parts = posixpath.relpath(f, p).split("/")
        if (any(x.startswith(".") for x in parts) or any(x in exclude_dirs for x in parts[:-1])
                or (suffix and not parts[-1].endswith(suffix))):
            continue
        rels.append(parts)
    # os.walk order: at the first differing level a file comes before a directory
    rels.sort(key=lambda parts: [(1, x) for x in parts[:-1]] + [(0, parts[-1])])
    return [join(root, *parts) for parts in rels]


def glob(pattern) -> list[str]:
    """Sorted files matching the pattern (`**` matches any depth; locally Python's glob rules)."""
    if not is_gcs(pattern):
        return sorted(p for p in _pyglob.glob(os.path.expanduser(str(pattern)), recursive=True) if os.path.isfile(p))
    fs, p = _fs(pattern)
    return sorted(_url(h) for h in fs.glob(p) if fs.isfile(h))


# ----------------------------------------------------------------------------- reading and writing


def open_file(path, mode: str = "rb", **kw):
    """A file object (fsspec). Writing to gs:// uploads when the file is closed."""
    fs, p = _fs(path)
    if "w" in mode and not is_gcs(path):
        fs.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    try:
        return fs.open(p, mode, **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found") from e


def read_bytes(path) -> bytes:
    fs, p = _fs(path)
    try:
        return fs.cat_file(p)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: not found") from e


def read_text(path, encoding: str = "utf-8", errors: str = "strict") -> str:
    return read_bytes(path).decode(encoding, errors)


def read_jsonl(path, error: type = ValueError) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line of a JSONL file (local or gs://); a line that
    is not JSON raises `error` naming path:line."""
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{n}: not JSON ({e})") from None


def write_bytes(path, data: bytes) -> None:
    """Writes the whole file: one upload on gs://; locally through a temp file and a rename, so a
    reader never sees half a file."""
    if is_gcs(path):
        fs, p = _fs(path)
        fs.pipe_file(p, bytes(data))
        return
    p = os.path.abspath(os.path.expanduser(str(path)))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    tmp = f"{p}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, p)


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def makedirs(path) -> None:
    """Creates a local directory (and parents); gs:// has no directories, so only the bucket is checked."""
    fs, p = _fs(path)
    if not is_gcs(path):
        os.makedirs(p, exist_ok=True)


def remove(path) -> None:
    fs, p = _fs(path)
    fs.rm(p, recursive=fs.isdir(p))


def copy_file(src, dst) -> None:
    """One file from anywhere to anywhere (server-side copy within GCS)."""
    if is_gcs(src) and is_gcs(dst):
        fs, s = _fs(src)
        fs.copy(s, _fs(dst)[1])
    elif is_gcs(dst):
        fs, d = _fs(dst)
        fs.put_file(os.path.expanduser(str(src)), d)
    elif is_gcs(src):
        fs, s = _fs(src)
        local = os.path.abspath(os.path.expanduser(str(dst)))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp{os.getpid()}"
        fs.get_file(s, tmp)
        os.replace(tmp, local)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(os.path.expanduser(str(dst)))), exist_ok=True)
        shutil.copy2(os.path.expanduser(str(src)), os.path.expanduser(str(dst)))


def upload_dir(local_dir: str, dst) -> None:
    """Every file below a local directory to dst (a gs:// prefix or a local directory)."""
    for root, _, files in os.walk(local_dir):
        for f in sorted(files):
            src = os.path.join(root, f)
            copy_file(src, join(dst, os.path.relpath(src, local_dir).replace(os.sep, "/")))


def cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "a3jax")


def local_copy(path, names=None) -> str:
    """A local path with the contents of `path`: the path itself when local; for gs:// a copy under
    cache_dir()/gcs/BUCKET/... (a file, or a directory's files: all of them, or only `names` where they
    exist). Files already cached with the same size are not fetched again; concurrent processes on one
    host each write a temp file and rename it, so they never see half a file."""
    if not is_gcs(path):
        return os.path.abspath(os.path.expanduser(str(path)))
    url = normalize(path)
    local = os.path.join(cache_dir(), "gcs", *url[len(GCS):].split("/"))
    if isfile(url):
        _fetch(url, local)
        return local
    if not isdir(url):
        raise FileNotFoundError(f"{url}: not found")
    files = find(url) if names is None else [join(url, n) for n in names if isfile(join(url, n))]
    for f in files:
        _fetch(f, os.path.join(local, *relpath(f, url).split("/")))
    os.makedirs(local, exist_ok=True)
    return local


def _fetch(url: str, local: str) -> None:
    if os.path.isfile(local) and os.path.getsize(local) == size(url):
        return
    copy_file(url, local)


# ----------------------------------------------------------------------------- appends


class AppendFile:
    """A file that grows by appends. Locally an ordinary append file, flushed at every `flush()`.

    On gs://, `write` only buffers and `flush(force=False)` writes out when `interval_s` has passed
    since the last write-out (always with force=True, and on close). GCS objects cannot be appended to, so on gs:// the object is
    rewritten whole (its current contents + the new lines, kept in memory): one upload per interval,
    not one per line. Metrics and event files stay small (a line per log step), so this is cheap; a
    kill loses at most the lines since the last write-out, and the trainer forces one at every
    checkpoint, so the lines up to a checkpoint are always there when a run resumes from it."""

    def __init__(self, path, initial: Optional[bytes] = None, interval_s: float = 30.0):
        """initial: the file's new contents (replacing what is there); None keeps what is there."""
        self.path, self.interval_s = str(path), float(interval_s)
        self.remote = is_gcs(path)
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # TensorBoard writes from its own thread
        self._last = time.monotonic()
        if initial is not None:
            write_bytes(self.path, initial)
        if self.remote:
            self._data = bytearray(initial if initial is not None else
                                   (read_bytes(self.path) if exists(self.path) else b""))
        else:
            self._f = open_file(self.path, "ab")

    def write(self, data: bytes) -> None:
        with self._lock:
            self._pending.append(bytes(data))

    def flush(self, force: bool = False) -> None:
        with self._lock:
            if not self._pending or (self.remote and not force and time.monotonic() - self._last < self.interval_s):
                return
            chunk = b"".join(self._pending)
            self._pending = []
            if self.remote:
                self._data += chunk
                write_bytes(self.path, bytes(self._data))
            else:
                self._f.write(chunk)
                self._f.flush()
            self._last = time.monotonic()

    def close(self) -> None:
        self.flush(force=True)
        if not self.remote:
            self._f.close()


def move_local(src, dst) -> None:
    """A rename, local paths only (gs:// has none: copying a checkpoint's every object is what we avoid)."""
    if is_gcs(src) or is_gcs(dst):
        raise StorageError(f"cannot rename {src} -> {dst} on GCS (no rename there)")
    shutil.move(os.path.expanduser(str(src)), os.path.expanduser(str(dst)))
