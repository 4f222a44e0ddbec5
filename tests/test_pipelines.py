"""The four seed pipelines run end to end through the CLI, each stage reading the previous stage's export."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PIPELINES = Path(__file__).parents[1] / "examples" / "pipelines"
SMOKE = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "script, last_stage, says",
    [
        ("sft_dpo.sh", "dpo", "DPOModule reference: frozen copy of the starting policy"),
        ("sft_lora_dpo.sh", "dpo", "DPOModule reference: frozen start adapter"),
        ("rlhf.sh", "ppo", "PPOModule reference: adapter-disabled base; rewards: runs/pipelines/rlhf/reward/export"),
        ("qlora_dpo.sh", "dpo", "DPOModule reference: adapter-disabled base"),
    ],
)
def test_pipeline_runs_each_stage_from_the_previous_export(tiny_model, tmp_path, script, last_stage, says):
    env = {
        **os.environ,
        "LIGHTNING_ALIGN": f"{sys.executable} -m lightning_align",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        ["bash", str(PIPELINES / script), *SMOKE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert says in output
    out = tmp_path / "runs" / "pipelines" / script.removesuffix(".sh")
    assert (out / last_stage / "export" / "config.json").is_file()
