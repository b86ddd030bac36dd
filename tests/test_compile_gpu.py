"""`a3jax compile --platform cuda`: the train step, prefill and a cached decode step lowered for GPUs
on this CPU-only host (jax.export for CUDA over an AbstractMesh of H100s), so that a GPU user never
meets a lowering error first: `auto` resolves to the fused Triton kernel there, and the programs hold
its forward (and, in the train step, its two backward kernels) as Triton custom calls instead of an
interpreted loop."""
from __future__ import annotations

import json

import pytest

from a3jax.compile import cli_main

# The LLaMA-3.2-1B shape at T = 2048 with its own recipe (bf16, scanned layers), over 8 GPUs.
LLAMA_1B = """\
model: llama3.2-1b
data:
  seq_len: 2048
mesh: {data: 1, fsdp: -1, tensor: 1}
train:
  global_batch_size: 16
"""
TINY = """\
model: tiny
data:
  seq_len: 64
mesh: {data: 1, fsdp: -1, tensor: 2}
train:
  global_batch_size: 8
"""
KERNELS = {"a3_attention_fwd", "a3_attention_dq", "a3_attention_dkv"}


def _run(tmp_path, capsys, text, *args):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(text)
    out = tmp_path / "report.json"
    rc = cli_main([str(cfg), "--platform", "cuda", "--json", str(out), *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, (json.loads(out.read_text()) if out.exists() else None)


def test_llama_1b_train_prefill_decode_lower_for_cuda_with_the_triton_kernel(tmp_path, capsys):
    rc, out, err, rep = _run(tmp_path, capsys, LLAMA_1B, "--gpus", "8", "--group-size", "4")
    assert rc == 0, err
    assert rep["device_kind"] == "NVIDIA H100 80GB HBM3" and rep["devices"] == 8 and rep["mesh"]["fsdp"] == 8
    assert rep["model"]["attention"] == "auto" and rep["attention_kernel"] == "pallas_gpu"
    assert rep["model"]["hidden_size"] == 2048 and rep["params"] > 1.2e9
    train, prefill, decode = (rep["programs"][p] for p in ("train", "prefill", "decode"))
    assert set(train["kernel_names"]) == KERNELS and train["batch"] == [16, 2048]
    assert prefill["kernel_names"] == ["a3_attention_fwd"] and decode["kernel_names"] == ["a3_attention_fwd"]
    assert decode["group_size"] == 4
    assert "attention kernel pallas_gpu" in out and "lowers: yes" in out


def test_a_configured_kernel_is_what_lowers_and_a_tensor_axis_splits_heads(tmp_path, capsys):
    rc, _, err, rep = _run(tmp_path, capsys, TINY, "--gpus", "4", "--programs", "train",
                           "model.attention=blockwise")
    assert rc == 0, err
    assert rep["attention_kernel"] == "blockwise" and rep["programs"]["train"]["triton_kernels"] == 0
    rc, _, err, rep = _run(tmp_path, capsys, TINY, "--gpus", "4", "--gpu", "a100", "model.dtype=bfloat16")
    assert rc == 0, err
    assert rep["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and rep["device_kind"].startswith("NVIDIA A100")
    assert set(rep["programs"]["train"]["kernel_names"]) == KERNELS


@pytest.mark.parametrize("args, rc_want, message", [
    (["--gpu", "k80"], 1, "--gpu 'k80' is not one of h100"),
    (["--gpus", "3"], 1, "mesh"),                      # tensor=2 does not divide 3 GPUs
    (["--programs", "train,serve"], 1, "'serve' is not one of train, prefill, decode"),
    (["--topology", "v5e:2x2"], 2, "exclude each other"),
])
def test_bad_gpu_arguments_are_named(tmp_path, capsys, args, rc_want, message):
    rc, _, err, rep = _run(tmp_path, capsys, TINY, *args)
    assert rc == rc_want and message in err and rep is None


def test_a_platform_that_is_not_a_gpu_is_refused(tmp_path, capsys):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text(TINY)
    assert cli_main([str(cfg), "--platform", "tpu"]) == 2
    assert "--platform 'tpu' is not one of cuda, rocm" in capsys.readouterr().err
    assert cli_main([str(cfg)]) == 2
    assert "give --topology" in capsys.readouterr().err
