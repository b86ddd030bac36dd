"""gs:// run directories, checkpoints, data and conversion against the real GCS emulator (in memory, on
a free loopback port; tests/gcs_emulator.py): kill -9 / SIGTERM / resume on gs:// equals an
uninterrupted local run bit for bit; a corrupt latest checkpoint is kept in place, not renamed; data
from gs:// JSONL, Parquet and ArrayRecord; `convert hf-to-a3` from and to gs://; a 2-process
launch/local.sh run whose gs:// checkpoint restores on 1 process; bad input fails fast and names it."""
from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gcs_emulator
from a3jax import fs
from a3jax.checkpoint import RunCheckpoints, export_run, load_params
from a3jax.config import DataConfig, MeshConfig, StageConfig
from a3jax.data import ByteTokenizer, load_corpus, load_tokenizer, make_train_iterator
from a3jax.data.prepare import prepare
from a3jax.model import param_shapes, param_shardings
from a3jax.sharding import make_mesh, rules_of
from a3jax.train.state import abstract_state, make_optimizer, state_shardings
from a3jax.train.trainer import train
from train_helpers import (compile_cache, corpus, exact_view, tiny_config,  # noqa: F401 (fixtures)
                           paused_train_command, tiny_overrides, wait_for)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "a3jax-test"
GS = f"gs://{BUCKET}"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator for this module; its variables are set in this process (and passed to children)."""
    log = str(tmp_path_factory.mktemp("emulator") / "emulator.log")
    saved = {k: os.environ.get(k) for k in gcs_emulator.ENV_KEYS + (fs.CACHE_ENV,)}
    with gcs_emulator.start(BUCKET, log) as env:
        os.environ.update(env)
        os.environ[fs.CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))  # gs:// inputs copied here
        fs.reset()
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            fs.reset()


@pytest.fixture(scope="module")
def gs_corpus(gcs, corpus):
    fs.copy_file(corpus, f"{GS}/data/alpha.jsonl")
    return f"{GS}/data/alpha.jsonl"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """An uninterrupted local 12-step run (checkpoints 6 and 12), local data."""
    cfg = tiny_config(tmp_path_factory.mktemp("ref") / "run", corpus)
    assert train(cfg, progress_bar=False, tensorboard=False)["step"] == 12
    return cfg


def _params(path):
    return jax.device_get(ocp.StandardCheckpointer().restore(path)["params"])


def _assert_bitwise_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{jax.tree_util.keystr(k)} differs"


def _records(run_dir):
    return [json.loads(line) for line in fs.read_text(fs.join(run_dir, "metrics.jsonl")).splitlines()]


def _spawn(run_dir, data, env, log, sleep):
    cmd = paused_train_command(sleep, ["--no-progress", *tiny_overrides(run_dir, data, **{"train.eval_batches": 1})])
    env = dict(os.environ, PYTHONPATH=ROOT, **env)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _committed(run, step):
    return fs.exists(f"{run}/checkpoints/{step}/commit_success.txt")  # Orbax's marker on GCS


def _steps(run):
    return sorted(int(n) for n in fs.listdir(f"{run}/checkpoints") if n.isdigit()) if fs.isdir(f"{run}/checkpoints") else []


# ----------------------------------------------------------------------------- run checkpoints on gs://


@pytest.fixture(scope="module")
def gs_run(gcs, gs_corpus, reference, compile_cache, tmp_path_factory):
    """kill -9 after checkpoint 6, resume + SIGTERM, resume to the end: all with run_dir on gs://."""
    run, logs = f"{GS}/runs/faults", tmp_path_factory.mktemp("logs")
    env = {**gcs, **compile_cache}
    proc = _spawn(run, gs_corpus, env, logs / "1.log", sleep=0.3)
    wait_for(lambda: _committed(run, 6), proc, "checkpoint 6 on gs://")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert _steps(run) == [6], "the kill came too late"
    # buffered metrics: written out before checkpoint 6, so the kill lost none up to it
    assert [r["step"] for r in _records(run) if r["kind"] == "train"][:3] == [2, 4, 6]
    proc = _spawn(run, gs_corpus, env, logs / "2.log", sleep=0.3)
    wait_for(lambda: "step 8/12" in (logs / "2.log").read_text(), proc, "the resumed run's step 8")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, (logs / "2.log").read_text()[-3000:]
    out2 = (logs / "2.log").read_text()
    assert "resumed from checkpoint 6" in out2
    saved = _steps(run)[-1]
    assert 6 < saved < 12 and f"signal {int(signal.SIGTERM)} at step {saved}" in out2
    # the metrics lines up to the SIGTERM checkpoint were written out (gs:// buffers them)
    assert max(r["step"] for r in _records(run) if r["kind"] == "train") >= 8
    out = train(tiny_config(run, gs_corpus), progress_bar=False, tensorboard=True)
    assert out["resumed_from"] == saved and out["step"] == 12
    return run, saved


@pytest.mark.slow
def test_kill9_sigterm_resume_on_gcs_equals_uninterrupted_local_run(gs_run, reference):
    run, _ = gs_run
    _assert_bitwise_equal(_params(f"{run}/checkpoints/12/state"), _params(f"{reference.run_dir}/checkpoints/12/state"))
    assert exact_view(_records(run)) == exact_view(_records(reference.run_dir))
    names = fs.listdir(run)
    assert {"config.yaml", "metrics.jsonl", "tensorboard", "checkpoints"} <= set(names)
    events = fs.find(f"{run}/tensorboard")
    assert events and fs.size(events[-1]) > 0  # the TensorBoard events went to gs:// too


@pytest.mark.slow
def test_gcs_checkpoint_restores_onto_another_mesh_bit_exact(gs_run, reference):
    run, _ = gs_run
    mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2)
    mesh, rules = make_mesh(mesh_cfg), rules_of(mesh_cfg)
    opt, _ = make_optimizer(reference.train.optimizer, reference.total_steps)
    shapes = param_shapes(reference.model)
    ssh = state_shardings(opt, param_shardings(reference.model, mesh, rules), shapes, mesh)
    ck = RunCheckpoints(run, reference.checkpoint)
    state = ck.restore_state(12, abstract_state(opt, shapes, ssh))
    ck.close()
    assert state.params["layers"]["w_gate"].sharding.spec == ssh.params["layers"]["w_gate"].spec
    _assert_bitwise_equal(jax.device_get(state.params), _params(f"{reference.run_dir}/checkpoints/12/state"))


@pytest.mark.slow
def test_a_gcs_run_exports_and_reads_as_a_checkpoint(gs_run, reference):
    run, _ = gs_run
    want = _params(f"{reference.run_dir}/checkpoints/12/state")
    out = export_run(run, f"{GS}/exports/final")  # gs:// to gs://
    assert fs.isfile(f"{out}/model.yaml")
    _assert_bitwise_equal(load_params(out, host=True)[1], want)
    _assert_bitwise_equal(load_params(run, host=True)[1], want)  # the run directory itself as --ckpt


@pytest.mark.slow
def test_corrupt_latest_on_gcs_is_skipped_and_kept_in_place(gs_run, gs_corpus):
    run, saved = gs_run
    bad = [f for f in fs.find(f"{run}/checkpoints/12/state") if "/d/" in f or f.endswith("manifest.ocdbt")]
    assert bad
    for f in bad:
        fs.write_bytes(f, b"\x00garbage")
    before = {f: fs.read_bytes(f) for f in fs.find(f"{run}/checkpoints/12")}
    # resume on another mesh with 6 more steps and max_to_keep=2: 12 is skipped, the run continues
    # from `saved` (resharded), does not save over 12, saves 18; Orbax's clean-up leaves 12 alone
    cfg = tiny_config(run, gs_corpus, **{"data.stages": "[{ar: 6}, {random:4: 12}]", "mesh.fsdp": 2,
                                         "mesh.tensor": 4, "checkpoint.max_to_keep": 2})
    out = train(cfg, progress_bar=False, tensorboard=False)
    assert out["resumed_from"] == saved and out["step"] == 18 and out["last_checkpoint"] == 18
    assert {f: fs.read_bytes(f) for f in fs.find(f"{run}/checkpoints/12")} == before  # kept, untouched
    ledger = json.loads(fs.read_text(f"{run}/checkpoints_bad.json"))
    assert list(ledger["steps"]) == ["12"] and ledger["steps"]["12"]["path"] == f"{run}/checkpoints/12"
    assert not fs.exists(f"{run}/checkpoints_bad")  # nothing renamed or copied
    assert _steps(run) == [saved, 12, 18]  # 6 garbage-collected (latest 2 good kept), 12 preserved
    # a later run neither retries nor trips over it
    again = train(cfg, progress_bar=False, tensorboard=False)
    assert again["resumed_from"] == 18 and again["step"] == 18


def test_metrics_on_gcs_are_buffered_not_uploaded_per_line(gcs):
    from a3jax.train.metrics import MetricsSink, read_metrics

    run = f"{GS}/runs/buffered"
    sink = MetricsSink(run, 0, 10, tensorboard=True, progress_bar=False, flush_s=3600)
    for step in range(1, 6):
        sink.write({"step": step, "kind": "train", "loss": 1.0 / step})
    assert not fs.exists(f"{run}/metrics.jsonl")  # five records, no upload yet
    sink.flush()  # what the trainer does before every checkpoint
    assert [r["step"] for r in read_metrics(run)[0]] == [1, 2, 3, 4, 5]
    sink.write({"step": 6, "kind": "eval", "loss": {"ar": 0.5}})
    sink.close()
    train_recs, evals = read_metrics(run)
    assert len(train_recs) == 5 and evals == [{"step": 6, "kind": "eval", "loss": {"ar": 0.5}}]
    (events,) = fs.find(f"{run}/tensorboard")
    assert fs.size(events) > 100  # header + 6 scalars, written at close
    # a resumed run (start_step=3) drops the records after 3, as locally
    MetricsSink(run, 3, 10, tensorboard=False, progress_bar=False).close()
    assert [r["step"] for r in read_metrics(run)[0]] == [1, 2, 3]


# ----------------------------------------------------------------------------- data from gs://


def _data_cfg(source, **kw):
    return DataConfig(source=source, seq_len=32, heldout_fraction=0.2, prefetch=0,
                      stages=[StageConfig(strategy="ar", steps=4)], **kw)


def _batches(source, n=2):
    it = make_train_iterator(_data_cfg(source), 8)
    return [next(it) for _ in range(n)]


def test_training_data_from_gcs_jsonl_parquet_arrayrecord(gcs, corpus, tmp_path):
    texts = [json.loads(line)["text"] for line in open(corpus)]
    local_pq = str(tmp_path / "alpha.parquet")
    pq.write_table(pa.table({"text": texts}), local_pq)
    fs.copy_file(corpus, f"{GS}/src/alpha.jsonl")
    fs.copy_file(local_pq, f"{GS}/pq/alpha.parquet")
    prepare(f"{GS}/src/alpha.jsonl", "byte", f"{GS}/prepared", progress=False)  # reads and writes gs://
    prepare(corpus, "byte", str(tmp_path / "prepared"), progress=False)
    assert {"a3jax_data.json", "index.npz"} <= set(fs.listdir(f"{GS}/prepared"))
    cases = [(f"{GS}/src/alpha.jsonl", corpus), (f"{GS}/pq/alpha.parquet", local_pq),
             (f"{GS}/pq/*.parquet", local_pq), (f"{GS}/prepared", str(tmp_path / "prepared"))]
    for remote, local in cases:
        a, b = load_corpus(remote, ByteTokenizer()), load_corpus(local, ByteTokenizer())
        assert a.keys == b.keys and len(a) > 100, remote
        assert all(np.array_equal(a.doc(i), b.doc(i)) for i in range(len(a))), remote
        for x, y in zip(_batches(remote), _batches(local)):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x), remote


def test_tokenizer_directory_on_gcs(gcs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world", "hello fox"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fs.write_text(f"{GS}/tok/tokenizer.json", tok.to_str())
    fs.write_text(f"{GS}/tok/tokenizer_config.json", json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    t = load_tokenizer(f"{GS}/tok")
    assert (t.bos_id, t.eos_id, t.spec) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"), f"{GS}/tok")
    assert t.encode_np("hello fox").tolist() == [tok.token_to_id("hello"), tok.token_to_id("fox")]


# ----------------------------------------------------------------------------- conversion


@pytest.mark.needs_torch
def test_convert_hf_to_a3_from_and_to_gcs(gcs, tmp_path):
    from a3jax.convert import from_hf
    from a3jax.convert.cli import cli_main
    from hf_models import make_hf_llama

    local = tmp_path / "hf"
    make_hf_llama(str(local))
    fs.upload_dir(str(local), f"{GS}/hf/tiny")
    assert cli_main(["hf-to-a3", "--hf", f"{GS}/hf/tiny", "--out", f"{GS}/ckpt/tiny", "--no-progress"]) == 0
    cfg, params = load_params(f"{GS}/ckpt/tiny", host=True)
    want_cfg, want = from_hf(str(local))
    assert cfg == want_cfg
    _assert_bitwise_equal(params, want)
    _assert_bitwise_equal(from_hf(f"{GS}/hf/tiny")[1], want)  # the Python API takes gs:// too
    assert cli_main(["hf-to-a3", "--hf", f"{GS}/hf/tiny", "--out", f"{GS}/ckpt/tiny", "--no-progress"]) == 1  # no --force
    assert cli_main(["a3-to-hf", "--ckpt", f"{GS}/ckpt/tiny", "--out", f"{GS}/hf/back"]) == 0
    assert fs.isfile(f"{GS}/hf/back/config.json") and fs.glob(f"{GS}/hf/back/*.safetensors")


# ----------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_processes_write_one_gcs_checkpoint_that_restores_on_one(gcs, gs_corpus, reference, tmp_path):
    """launch/local.sh: 2 processes x 4 devices (the reference's 8-device mesh) write checkpoint 6 to
    gs://; this one process restores it and matches the 1-process reference's checkpoint 6."""
    run = f"{GS}/runs/two-proc"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("A3JAX_", "SLURM_"))}
    env.update(PYTHONPATH=ROOT, A3JAX_PYTHON=sys.executable, **gcs)
    proc = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "--devices", "4", "--log-dir", str(tmp_path / "logs"),
                           "2",
                           *tiny_overrides(run, gs_corpus, **{"train.eval_every": 0}), "--no-progress",
                           "--stop-at-step", "6"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 cpu devices, 2 process(es)" in (tmp_path / "logs" / "process_0.log").read_text()
    assert _steps(run) == [6]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(fs.listdir(f"{run}/checkpoints/6/state"))
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(fs.listdir(f"{run}/checkpoints/6/data"))
    mesh, rules = make_mesh(reference.mesh), rules_of(reference.mesh)
    opt, _ = make_optimizer(reference.train.optimizer, reference.total_steps)
    shapes = param_shapes(reference.model)
    ssh = state_shardings(opt, param_shardings(reference.model, mesh, rules), shapes, mesh)
    ck = RunCheckpoints(run, reference.checkpoint)
    state = ck.restore_state(6, abstract_state(opt, shapes, ssh))
    ck.close()
    assert int(state.step) == 6
    # the same global program on 2 processes: equal up to the order of cross-process reductions
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.device_get(state.params), _params(f"{reference.run_dir}/checkpoints/6/state"))


# ----------------------------------------------------------------------------- bad input


def test_missing_bucket_and_object_are_named(gcs):
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        fs.exists("gs://no-such-bucket/run")
    with pytest.raises(FileNotFoundError, match=f"{GS}/nothing/here.jsonl"):
        fs.read_bytes(f"{GS}/nothing/here.jsonl")
    with pytest.raises(FileNotFoundError, match="data source not found: " + f"{GS}/nothing.jsonl"):
        load_corpus(f"{GS}/nothing.jsonl", ByteTokenizer())
    from a3jax.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=f"{GS}/no-ckpt: not found"):
        load_params(f"{GS}/no-ckpt")


def _train_cli(env, run_dir, timeout=120):
    env = {**{k: v for k, v in os.environ.items() if k not in gcs_emulator.ENV_KEYS}, **env, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "a3jax", "train", f"run_dir={run_dir}", "data.source=stdlib",
                           "--no-progress"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class _MetadataServer:
    """A loopback HTTP server in the place of the metadata address: Google's (it answers with
    Metadata-Flavor: Google) or another cloud's (it answers too, without that header)."""

    def __init__(self, google: bool):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                if google:
                    self.send_header("Metadata-Flavor", "Google")
                self.end_headers()
                self.wfile.write(b"instance/\n")

            def log_message(self, *args):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.srv.server_port}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def _no_credentials_env(tmp_path, metadata_host):
    # Nothing here can reach the internet: every credential source is absent or on loopback.
    return {"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "GCE_METADATA_HOST": metadata_host,
            "GOOGLE_APPLICATION_CREDENTIALS": ""}


def _assert_one_line_saying_what_to_set(r, seconds):
    assert r.returncode != 0
    assert seconds < 10, f"took {seconds:.1f} s"
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr[-3000:]
    for what in ("no Google Cloud credentials", "GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
                 "TENSORSTORE_GCS_HTTP_URL", "gs://some-bucket/run"):
        assert what in lines[0], lines[0]


def test_no_credentials_no_emulator_fails_fast_saying_what_to_set(tmp_path):
    t0 = time.monotonic()
    r = _train_cli(_no_credentials_env(tmp_path, "127.0.0.1:9"), "gs://some-bucket/run", timeout=60)
    _assert_one_line_saying_what_to_set(r, time.monotonic() - t0)


def test_another_clouds_metadata_server_is_not_a_credential(tmp_path):
    # It answers on the metadata address, but a token request to it would fail only after the auth
    # library looked Google's server up by name and retried for a minute.
    other = _MetadataServer(google=False)
    try:
        t0 = time.monotonic()
        r = _train_cli(_no_credentials_env(tmp_path, other.host), "gs://some-bucket/run", timeout=60)
        seconds = time.monotonic() - t0
    finally:
        other.close()
    _assert_one_line_saying_what_to_set(r, seconds)


def test_googles_metadata_server_is_a_credential(tmp_path, monkeypatch):
    google = _MetadataServer(google=True)
    try:
        for k, v in _no_credentials_env(tmp_path, google.host).items():
            monkeypatch.setenv(k, v)
        for k in gcs_emulator.ENV_KEYS:
            monkeypatch.delenv(k, raising=False)
        fs.check_credentials("gs://some-bucket/run")  # no StorageError
    finally:
        google.close()


def test_emulator_variable_without_a_server_or_without_its_twin(monkeypatch):
    port = gcs_emulator.free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    with pytest.raises(fs.StorageError, match=f"gs://b/run: no GCS emulator answers at STORAGE_EMULATOR_HOST={url}"):
        fs.check_credentials("gs://b/run")
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL")
    with pytest.raises(fs.StorageError, match="TENSORSTORE_GCS_HTTP_URL is not"):
        fs.check_credentials("gs://b/run")
