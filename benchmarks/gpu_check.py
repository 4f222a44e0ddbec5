"""One-command GPU check: every method x adapter x precision for a few steps on a ~100M model, the strategies
with 2 devices when present, measured peak against the plan, and tokens/s against TRL on the same GPU.

    make gpu-check        # or: python -m benchmarks.gpu_check

Without CUDA it says so and exits 0 (CI runs it on CPUs). On a GPU machine, put a CUDA build of torch 2.13 in the
virtual environment first (the Makefile pins the CPU build). Results: benchmarks/GPU-CHECK.md (commit it).
Each row: the loss (online methods: the rollout's mean reward) of the first and last of STEPS steps, the measured peak
(`torch.cuda.max_memory_allocated`) against `lightning_align.plan`, and tokens/s; with 2 or more devices, DDP,
FSDP2 (ModelParallelStrategy), FSDP and DeepSpeed ZeRO-2 / ZeRO-3 runs of SFT and DPO whose first-step loss must
equal the single-device one.
Budget: under 8 minutes on one modern GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).parent
METHODS = ["sft", "reward", "dpo", "kto", "orpo", "ppo", "grpo"]
ADAPTERS = ["none", "lora", "qlora"]
PRECISIONS = ["bf16-mixed", "bf16-true"]
# "fsdp2": Lightning's ModelParallelStrategy over a data-parallel mesh of all devices (the sharding the tests prove)
STRATEGIES = ["ddp", "fsdp2", "fsdp", "deepspeed_stage_2", "deepspeed_stage_3"]
SIZE, STEPS, BATCH = os.environ.get("GPU_CHECK_SIZE", "100M"), 6, 4


def reward_length(prompts, completions):
    return [min(len(c.split()), 20) / 20 for c in completions]


def run(method: str, adapter: str, precision: str, strategy: str = "auto", devices: int = 1) -> dict:
    """One fit in this process: losses, peak, plan, tokens/s."""
    import lightning as L

    import lightning_align as la
    from benchmarks.memory import SIZES, adapter_callbacks, build_fixture

    SIZES.setdefault(SIZE, (768, 8, 12, 2048))
    folder = str(build_fixture(ROOT / f".fixture-memory-{SIZE}", SIZE))
    rows = {"sft": "sft.jsonl", "ppo": "prompts.jsonl", "grpo": "prompts.jsonl"}.get(method, "pairs.jsonl")
    source = f"{folder}/{rows}"
    if method == "sft":
        data, module = la.SFTDataModule(folder, source, batch_size=BATCH, max_length=128), la.SFTModule(folder)
    elif method in ("ppo", "grpo"):
        data = la.PromptDataModule(folder, source, batch_size=BATCH, max_length=64)
        cls = la.PPOModule if method == "ppo" else la.GRPOModule
        extra = {"minibatch_size": BATCH} if method == "ppo" else {"num_generations": 4}
        rewards = {"reward": reward_length} if method == "ppo" else {"rewards": reward_length}
        module = cls(folder, **rewards, max_new_tokens=32, **extra)
    elif method == "kto":
        data = la.UnpairedPreferenceDataModule(folder, source, batch_size=BATCH, max_length=128)
        module = la.KTOModule(folder)
    else:
        data = la.PreferenceDataModule(folder, source, batch_size=BATCH, max_length=128)
        module = {"reward": la.RewardModule, "dpo": la.DPOModule, "orpo": la.ORPOModule}[method](folder)
    losses = []

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rollout = getattr(pl_module, "logged_rollout", None)  # online methods: the rollout's mean reward
            if rollout is not None:
                losses.append(float(rollout["reward/mean"]))
            elif "train/loss" in trainer.callback_metrics:
                losses.append(float(trainer.callback_metrics["train/loss"]))

    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
    report = la.MemoryReport()
    trainer = L.Trainer(
        accelerator=os.environ.get("GPU_CHECK_ACCELERATOR", "gpu"),  # "cpu": a smoke test of this script
        devices=devices,
        strategy=strategy,
        precision=precision,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[report, Losses(), *adapter_callbacks(adapter)],
        default_root_dir=tempfile.mkdtemp(prefix="gpu-check-"),  # each run's adapter in a fresh folder
    )
    L.seed_everything(0)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - started
    tokens = (
        STEPS
        * BATCH
        * (128 if method not in ("ppo", "grpo") else 96)
        * (2 if method in ("reward", "dpo", "orpo") else 1)
    )
    return {
        "losses": losses,
        "measured": report.measured(trainer) if trainer.is_global_zero else None,
        "planned": report.plan.peak if report.plan else None,
        "tokens_per_sec": tokens / seconds,
        "rank": trainer.global_rank,
    }


def child(args: list[str]) -> None:
    result = run(*args[:3], strategy=args[3], devices=int(args[4]))
    if result["rank"] == 0:
        print("RESULT " + json.dumps(result), flush=True)


def in_child(method, adapter, precision, strategy="auto", devices=1) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu_check",
        "--child",
        method,
        adapter,
        precision,
        strategy,
        str(devices),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def trl_rows() -> list[str]:
    """tokens/s of ours and TRL's SFT and DPO steps on this GPU (benchmarks.compare with BENCH_DEVICE=cuda)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return ["TRL is not installed (the `bench` extra): no comparison"]
    lines = []
    for method in ("sft", "dpo"):
        speeds = {}
        for framework in ("ours", "trl"):
            command = [sys.executable, "-m", "benchmarks.compare", "--child", framework, "--method", method]
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"BENCH_DEVICE": "cuda"})
            speeds[framework] = (
                json.loads(done.stdout.strip().splitlines()[-1])["tokens_per_sec"] if done.returncode == 0 else None
            )
        ratio = f"{speeds['ours'] / speeds['trl']:.2f}x" if all(speeds.values()) else "failed"
        lines.append(f"| {method} | {speeds['ours']} | {speeds['trl']} | {ratio} |")
    return ["| method | ours tokens/s | TRL tokens/s | ratio |", "|---|---:|---:|---:|", *lines]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to this torch build; skipped")
        return
    started = time.perf_counter()
    lines = [
        f"GPU check on {date.today()}: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, "
        f"{SIZE} Llama-shaped model, {STEPS} steps, micro-batch {BATCH}.",
        "",
        "| method | adapter | precision | first loss (reward) | last loss (reward) | planned MiB | measured MiB "
        "| error | tokens/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    single = {}
    for method in METHODS:
        for adapter in ADAPTERS:
            for precision in PRECISIONS:
                r = in_child(method, adapter, precision)
                single[method, adapter, precision] = r
                if "error" in r:
                    lines.append(f"| {method} | {adapter} | {precision} | failed: {r['error']} | | | | | |")
                    continue
                error = f"{r['measured'] / r['planned'] - 1:+.1%}" if r["planned"] else "no plan"
                losses = r["losses"] or [float("nan")]
                lines.append(
                    f"| {method} | {adapter} | {precision} | {losses[0]:.4f} | {losses[-1]:.4f} | "
                    f"{(r['planned'] or 0) / 2**20:.0f} | {r['measured'] / 2**20:.0f} | {error} | "
                    f"{r['tokens_per_sec']:.0f} |"
                )
                print(lines[-1], flush=True)
    if torch.cuda.device_count() >= 2:
        lines += [
            "",
            "| strategy | method | first loss (2 devices) | single device | equal |",
            "|---|---|---:|---:|---|",
        ]
        for strategy in STRATEGIES:
            for method in ("sft", "dpo"):
                r, one = in_child(method, "none", "bf16-mixed", strategy, 2), single[method, "none", "bf16-mixed"]
                if "error" in r or "error" in one:
                    lines.append(f"| {strategy} | {method} | failed: {r.get('error', one.get('error'))} | | |")
                    continue
                equal = abs(r["losses"][0] - one["losses"][0]) <= 1e-2 * max(1.0, abs(one["losses"][0]))
                lines.append(f"| {strategy} | {method} | {r['losses'][0]:.4f} | {one['losses'][0]:.4f} | {equal} |")
                print(lines[-1], flush=True)
    lines += ["", *trl_rows(), "", f"Whole check: {time.perf_counter() - started:.0f} s."]
    (ROOT / "GPU-CHECK.md").write_text("# GPU check\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
