"""Spare host devices for the CPU benchmarks, set before `jax` is imported.

With jaxlib 0.10.x a vmapped batch of QPs can hang on a CPU: its batched
LAPACK kernels split their batch into tasks on XLA's thread pool and wait
for them, and when every thread waits nothing runs them. Extra host devices
give the pool spare threads (docs/batches-and-devices.md); single-threaded
Eigen keeps each device's operations on one core. The first run of
`batched_qp.py` hung in its reference computation without them.
"""

import os


def add_spare_host_devices(count: int = 4) -> None:
    """Append the flags to any `XLA_FLAGS` already set, unless those already
    choose a host device count. Call before `import jax`."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={count}"
            " --xla_cpu_multi_thread_eigen=false"
        ).strip()
