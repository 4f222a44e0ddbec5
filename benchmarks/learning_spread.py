"""How the learning tests' gains spread over seeds, thread counts and CPU kernels, as other machines would run them.

Runs `pytest -m learning` once per setting (seed x OMP_NUM_THREADS x ATen CPU capability), reads the GAIN lines the
tests print (`tests.conftest.report_gain`) and whether each passed, and prints one table: each test's measurement
before -> after per setting, and the smallest and mean gain. A test whose smallest gain sits near its threshold
passes here and fails elsewhere.

    python -m benchmarks.learning_spread --seeds 0 1 2 --threads 1 2 [--capability default avx2] [-k grpo] [--jobs 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).parents[1]
GAIN = re.compile(r"^GAIN (\S+) (\S+) (\S+)(.*)$", re.M)
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR) (\S+)", re.M)


def run(seed: int, threads: int, capability: str, select: str | None) -> tuple[dict, dict, float]:
    """One pytest run of the learning tests: {test: (before, after, note)}, {test: outcome}, seconds."""
    env = {**os.environ, "LIGHTNING_ALIGN_TEST_SEED": str(seed), "OMP_NUM_THREADS": str(threads)}
    if capability != "default":  # ATen's vector kernels of an older CPU (summation order, hence sampled tokens)
        env["ATEN_CPU_CAPABILITY"] = capability
    command = [sys.executable, "-m", "pytest", "-m", "learning", "-q", "-s", "-rA", "-p", "no:cacheprovider"]
    command += ["-k", select] if select else []
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    gains = {test: (float(b), float(a), note.strip()) for test, b, a, note in GAIN.findall(done.stdout)}
    outcomes = {test: outcome for outcome, test in OUTCOME.findall(done.stdout)}
    return gains, outcomes, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--capability", nargs="+", default=["default"], help="ATEN_CPU_CAPABILITY values")
    parser.add_argument("-k", dest="select", help="pytest -k expression")
    parser.add_argument("--jobs", type=int, default=1, help="settings run at once (mind the cores)")
    args = parser.parse_args()
    settings = list(itertools.product(args.seeds, args.threads, args.capability))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda s: run(*s, args.select), settings))
    tests = sorted({test for gains, outcomes, _ in results for test in [*gains, *outcomes]})
    names = [f"seed {s}, {t} thr" + (f", {c}" if c != "default" else "") for s, t, c in settings]
    print("| test | " + " | ".join(names) + " | min gain | mean gain |")
    print("|---|" + "---:|" * (len(names) + 2))
    for test in tests:
        cells, deltas = [], []
        for gains, outcomes, _ in results:
            outcome = {"PASSED": "", "FAILED": " FAIL", "ERROR": " ERROR"}.get(outcomes.get(test, ""), " ?")
            if test in gains:
                before, after, _ = gains[test]
                deltas.append(after - before)
                cells.append(f"{before:.3f}->{after:.3f}{outcome}")
            else:
                cells.append(outcome.strip() or "-")
        spread = f"{min(deltas):+.3f} | {sum(deltas) / len(deltas):+.3f}" if deltas else "- | -"
        print(f"| {test.split('::', 1)[-1]} | " + " | ".join(cells) + f" | {spread} |")
    timing = ", ".join(f"{name}: {seconds:.0f}" for name, (_, _, seconds) in zip(names, results))
    print(f"\nseconds per setting: {timing}")


if __name__ == "__main__":
    main()
