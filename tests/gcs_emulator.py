"""A local GCS for the tests: the real `gcp-storage-emulator` (PyPI), in memory, on a free loopback port.

    python tests/gcs_emulator.py PORT BUCKET     runs it (what `start` spawns)
    with start("bkt") as env: ...                 env: the variables a process needs to use it

One fix is applied before it starts: its object downloads do not send `x-goog-generation` and ignore
`ifGenerationMatch` / `ifGenerationNotMatch` (real GCS does both). tensorstore revalidates the
OCDBT manifest with such conditional reads while Orbax commits, and fails ("Malformed
StorageGeneration") on the emulator's answer; the wrapper below answers as GCS does (the generation
header, 304 when the generation matches ifGenerationNotMatch, 412 when it does not match
ifGenerationMatch). Everything else is the emulator as published.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from http import HTTPStatus

ENV_KEYS = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")


def _patch():
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return original(request, response, storage, *args, **kwargs)
        gen = str(obj.get("generation"))
        q = request.query
        response["x-goog-generation"] = gen
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
        if q.get("ifGenerationNotMatch") and q["ifGenerationNotMatch"][0] == gen:
            response.status = HTTPStatus.NOT_MODIFIED
            return None
        if q.get("ifGenerationMatch") and q["ifGenerationMatch"][0] != gen:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        return original(request, response, storage, *args, **kwargs)

    objects.download = download  # objects.get(alt=media) looks it up by name
    for _, handlers in server.HANDLERS:
        for method, fn in list(handlers.items()):
            if fn is original:
                handlers[method] = download


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(url: str) -> dict:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@contextlib.contextmanager
def start(bucket: str, log_path: str = os.devnull):
    """Runs the emulator for the block; yields the environment variables that point at it."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(port), bucket],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            if proc.poll() is not None or time.time() - t0 > 60:
                raise RuntimeError(f"the GCS emulator did not start (see {log_path})")
            time.sleep(0.1)
        yield env_for(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


if __name__ == "__main__":
    _patch()
    from gcp_storage_emulator.__main__ import main

    main(["start", "--host", "127.0.0.1", "--port", sys.argv[1], "--default-bucket", sys.argv[2],
          "--no-store-on-disk", "--quiet"])
