"""Test setup: CPU with 8 fake devices (must happen before jax is imported anywhere)."""
import importlib.metadata
import os


def _jaxlib_version() -> tuple:
    return tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])


os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite's models are tiny: compiling, not running, is most of its time, and LLVM's optimisation
# passes are most of a CPU compile. Level 0 cuts the suite by about a third; it changes no float
# semantics (no fast-math either way), and child processes inherit it.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
# jaxlib 0.10's MLIR fusion emitters compile elementwise fusions about twice as slowly as its older
# emitters (the suite's tests run in about half the CPU time without them). No fast-math either way,
# and tests compare runs made under the same flags. The flag is gone in later jaxlibs (which abort on
# an unknown flag), so only where it exists.
CPU_ONLY_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
if _jaxlib_version() < (0, 11) and "xla_cpu_use_fusion_emitters" not in flags:
    flags += " " + CPU_ONLY_FLAGS[0]
os.environ["XLA_FLAGS"] = flags.strip()

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")


# `make test` runs two xdist workers that take whole modules (--dist loadfile) in collection order
# (--no-loadscope-reorder). A heavy module handed out last leaves the other worker idle, so the
# heaviest modules (measured with --durations) go first and the many light ones fill in at the end.
HEAVY_FIRST = ("test_smollm2", "test_gcs", "test_docs_examples", "test_distributed", "test_decode_dynamic",
               "test_demo", "test_train_faults", "test_decode_speculative", "test_train", "test_device_check",
               "test_model", "test_decode_engine", "test_compile", "test_objectives", "test_decode")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}

    def key(item):
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
        return rank.get(module, len(rank))

    items.sort(key=key)  # stable: the rest keep their order


@pytest.fixture
def tpu_compiler_env(monkeypatch):
    """XLA_FLAGS without the CPU-only flags: libtpu (the TPU compiler some tests load beside the CPU
    backend) parses XLA_FLAGS too and aborts the process on a flag its own XLA does not define."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in CPU_ONLY_FLAGS]
    monkeypatch.setenv("XLA_FLAGS", " ".join(kept))
