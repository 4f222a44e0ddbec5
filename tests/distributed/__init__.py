import os
import subprocess
import sys
from pathlib import Path


def run_on_two_and_one(script: Path, out: Path) -> Path:
    """Runs a test script on 2 processes, then on 1 (Lightning relaunches it for the second process), each writing
    its results under `out`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(script.parents[2])}
    for devices in (2, 1):
        done = subprocess.run(
            [sys.executable, str(script), str(out), str(devices)], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return out
