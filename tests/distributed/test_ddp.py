"""Every module under `strategy="ddp"` with 2 CPU processes (gloo) trains as one process does with the same
global batch; validation metrics are reduced across processes; only the first process writes files."""

import csv
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_two_and_one

SCRIPT = Path(__file__).with_name("ddp_run.py")
CASES = ["sft", "sft-lora", "reward", "dpo", "dpo-lora", "dpo-precomputed", "ppo-lora"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    return run_on_two_and_one(SCRIPT, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("ppo")])
def test_two_processes_train_like_one_with_the_same_global_batch(runs, case):
    one, two = torch.load(runs / f"{case}-1.pt"), torch.load(runs / f"{case}-2.pt")
    assert two["world_size"] == 2 and two["ranks_agree"]
    assert one["weights"].keys() == two["weights"].keys()
    for name, weight in one["weights"].items():
        # AdamW's first steps divide by tiny second moments, which magnifies float summation-order differences.
        torch.testing.assert_close(two["weights"][name], weight, rtol=1e-3, atol=2e-4, msg=name)
    assert two["val"] == pytest.approx(one["val"], rel=1e-5)  # the metric is reduced over both processes' halves


def test_ppo_runs_under_ddp_with_lora_and_keeps_the_ranks_in_step(runs):
    # Each process samples its own rollouts, so the trajectory differs from one process's; the weights must not
    # differ between the processes (DDP averages every gradient step).
    two = torch.load(runs / "ppo-lora-2.pt")
    assert two["world_size"] == 2 and two["ranks_agree"]


@pytest.mark.parametrize("devices", [1, 2])
def test_only_the_first_process_writes_exports_and_samples(runs, devices):
    rows = list(csv.DictReader(open(runs / "sft" / str(devices) / "version_0" / "samples.csv")))
    assert [r["step"] for r in rows] == ["2"] * 4 + ["3"] * 4  # once per logging step, not once per process
    for case in CASES:
        assert (runs / case / str(devices) / "export").is_dir()
