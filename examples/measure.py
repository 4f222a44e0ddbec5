"""Measure each method x adapter on the bundled tiny model and write the table into examples/README.md.

    python examples/measure.py

Each combination runs in its own process, so its peak memory is its own: trainable parameters, peak resident
memory, and the median time per training step (per rollout + learn batch for PPO) after two warm-up steps.
The numbers are the tiny model's: they show the trade-offs' direction, not a 7B model's absolute figures.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

COMBINATIONS = [
    ("sft", "full"),
    ("sft", "lora"),
    ("sft", "qlora"),
    ("reward", "full"),
    ("reward", "lora"),
    ("dpo", "full"),
    ("dpo", "lora"),
    ("dpo", "qlora"),
    ("ppo", "full"),
    ("ppo", "lora"),
]
README = Path(__file__).parent / "README.md"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def measure(method: str, variant: str, steps: int = 8) -> dict:
    import lightning as L
    import torch

    import lightning_align as la
    from lightning_align.demos import tiny_model_path, write_task_data

    torch.set_num_threads(2)
    L.seed_everything(0)
    model = str(tiny_model_path())
    data = write_task_data(Path("runs/measure/data"), n_train=400, n_val=50, verbose_share=0.5)
    if method == "sft":
        module, dm = la.SFTModule(model), la.SFTDataModule(model, data["sft_train"], batch_size=16, max_length=64)
    elif method in ("reward", "dpo"):
        module = la.RewardModule(model) if method == "reward" else la.DPOModule(model)
        dm = la.PreferenceDataModule(model, data["preference_train"], batch_size=16, max_length=64)
    else:
        module = la.PPOModule(model, reward="lightning_align.demos:task_reward", max_new_tokens=12)
        dm = la.PromptDataModule(model, data["prompts_train"], batch_size=16)
    adapter = {"full": [], "lora": [la.LoRA(r=8)], "qlora": [la.QLoRA(r=8)]}[variant]
    times: list[float] = []

    class StepTimer(L.Callback):
        def on_train_batch_start(self, *args):
            self.started = time.perf_counter()

        def on_train_batch_end(self, *args):
            times.append(time.perf_counter() - self.started)

    per_batch = 4 if method == "ppo" else 1  # PPO: 2 epochs x 2 minibatches of 8 per rollout batch of 16
    trainer = L.Trainer(
        max_steps=steps * per_batch,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[*adapter, StepTimer()],
        default_root_dir=tempfile.mkdtemp(prefix=f"measure-{method}-{variant}-"),  # the adapters: not kept
    )
    trainer.fit(module, datamodule=dm)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {
        "trainable": trainable,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_ms": 1000 * statistics.median(times[2:]),
    }


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return
    rows = [
        "| method | adapter | trainable parameters | peak memory (MiB) | time per step (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for method, variant in COMBINATIONS:
        done = subprocess.run([sys.executable, __file__, method, variant], capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            f"| {method} | {variant} | {result['trainable']:,} | {result['peak_mib']:.0f} | {result['step_ms']:.0f} |"
        )
        print(rows[-1], flush=True)
    note = (
        f"Measured by `python examples/measure.py` on {date.today()}, {platform.machine()} CPU, "
        f"{platform.python_version()}; batch 16, max length 64 (PPO: 16 prompts, 12 new tokens per rollout)."
    )
    table = "\n".join([BEGIN, note, "", *rows, END])
    text = README.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    README.write_text(text[:start] + table + text[end:])


if __name__ == "__main__":
    main()
