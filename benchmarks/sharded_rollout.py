"""GRPO's rollout and step with sharded weights (FSDP2 over 2 processes) against one process, the same global batch.

    python -m benchmarks.sharded_rollout

The model, prompts, reward and sampling of `benchmarks.online`'s GRPO comparison (about 20M parameters, fp32 on
CPU; 8 prompts x 4 samples of exactly 32 new tokens per rollout batch). One process with 2 threads takes the
whole batch; under `ModelParallelStrategy(data_parallel_size=2)` each of 2 processes (1 thread each) takes 4
prompts, gathers the sharded weights once for its decode and frees them after. Figures: medians over the timed
rollout batches of the seconds spent sampling and of the whole step, as seen by the first process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from benchmarks.compare import ROOT, build_fixture
from benchmarks.online import GENERATIONS, NEW_TOKENS, PROMPTS, fit_timed, grpo_module

WARMUP_STEPS, TIMED_STEPS = 1, 4


def child(devices: int) -> None:
    import torch
    from lightning.fabric.utilities import rank_zero_only

    torch.set_num_threads(2 // devices)
    folder = build_fixture(ROOT / ".fixture")

    def generation(stats: dict) -> tuple[float, int]:
        return stats["time/generate"], PROMPTS * GENERATIONS * NEW_TOKENS

    steps = fit_timed(folder, grpo_module(folder), PROMPTS, WARMUP_STEPS + TIMED_STEPS, generation, devices)
    if rank_zero_only.rank == 0:
        timed = steps[WARMUP_STEPS:]
        print(json.dumps({key: statistics.median(s[key] for s in timed) for key in ("generate", "total")}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(int(sys.argv[2]))
        return
    results = {}
    for devices in (1, 2):
        command = [sys.executable, "-m", "benchmarks.sharded_rollout", "--child", str(devices)]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ, cwd=ROOT.parent)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        results[devices] = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    one, two = results[1], results[2]
    print("| | one process (2 threads) | 2 sharded processes (1 thread each) | ratio |")
    print("|---|---:|---:|---:|")
    for key, name in (("generate", "sampling a rollout batch"), ("total", "whole step")):
        print(f"| {name} | {one[key]:.2f} s | {two[key]:.2f} s | {two[key] / one[key]:.2f}x |")


if __name__ == "__main__":
    main()
