import os

# Each pytest-xdist worker gets one core: XLA's intra-op thread pool stalls
# when two processes oversubscribe two cores. Set before jax is imported.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import jax  # noqa: E402

# The paper's accuracy claims are float64 claims; the library itself never
# flips this flag, the tests do.
jax.config.update("jax_enable_x64", True)
