"""`benchmarks/device.py --quick` runs on a CPU (the script is there for the
day a GPU is available; it must keep working without one)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute of compiles
def test_device_script_quick_runs_on_cpu(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device.py"), "--quick", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    table = (tmp_path / "device_cpu_quick.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms" not in line]
    # 3 QP rows per dtype, one logistic row, 3 DEQ gradients and the forward.
    assert len(rows) == 3 * 2 + 1 + 4, table
    assert all(line.rstrip().endswith("| ok |") for line in rows), table
