"""Test setup: CPU with 8 fake devices (must happen before jax is imported anywhere)."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The suite's models are tiny: compiling, not running, is most of its time, and LLVM's optimisation
# passes are most of a CPU compile. Level 0 cuts the suite by about a third; it changes no float
# semantics (no fast-math either way), and child processes inherit it.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
settings.load_profile("ci")
