"""The memory planner against measured peaks: each method x adapter on Llama-shaped models of three sizes.

    python -m benchmarks.memory                 # every row, written to benchmarks/MEMORY.md
    python -m benchmarks.memory --sizes 20M     # the smallest size only (a quick check)
    python -m benchmarks.memory --devices 2 --sizes 150M --adapters none lora   # sharded (FSDP2) rows

Each row runs in a process of its own: a few training steps of the real module through `Trainer.fit`, with
`MemoryReport` measuring. On a CPU the measure is the peak resident memory above the process's baseline (what it
held just before the fit: libraries imported, data tokenised), which the table shows, with glibc told to return
freed blocks at once (`CHILD_ENV`); on a GPU
`torch.cuda.max_memory_allocated`, and the table goes to MEMORY-GPU.md. Every row of the data is exactly
`max_length` tokens long (prompts of PPO: `max_length`, answers `max_new_tokens`), and SFT scores every token
(`train_on_prompt`), as the plan assumes. QLoRA
rows quantise a bfloat16 checkpoint (see `build_fixture`).
Target: |measured / planned - 1| <= 10% on every row; the worst row is printed last.

With `--devices N` every row trains sharded (Lightning's ModelParallelStrategy, FSDP2 over N processes, each
with the same micro-batch) against `plan --strategy fsdp --devices N`; the measure is the largest of the
processes' peaks, and the table becomes the "Sharded" section of MEMORY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).parent
VOCAB = 32_000
# name: (hidden, layers, heads, intermediate)
SIZES = {
    "20M": (256, 4, 4, 1024),
    "150M": (768, 12, 12, 2048),
    "600M": (1536, 16, 16, 4096),
}
WARM_UP = "warm-up"
SIZES[WARM_UP] = (64, 2, 4, 128)
METHODS = ["sft", "reward", "dpo", "ppo"]
ADAPTERS = ["none", "lora", "qlora"]
BATCH, MAX_LENGTH, NEW_TOKENS, STEPS = 2, 128, 16, 2


def build_fixture(folder: Path, size: str) -> Path:
    """A random Llama-shaped model of `size`, a word-level tokenizer (one token per word) and rows that fill
    max_length exactly."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.compare import word_tokenizer

    if (folder / "bf16" / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(VOCAB)
    tokenizer.save_pretrained(folder)
    hidden, layers, heads, intermediate = SIZES[size]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_LENGTH + NEW_TOKENS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    # QLoRA rows load a bfloat16 copy, as published checkpoints are: from a float32 file a CPU keeps the float32
    # tensors (embeddings, output layer) as views of the mapped file, and with them every page of it read while
    # quantising (reclaimable page cache, but resident: +68% at 150M).
    model.to(torch.bfloat16).save_pretrained(folder / "bf16")
    tokenizer.save_pretrained(folder / "bf16")
    rng = random.Random(0)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(4, VOCAB)}" for _ in range(n))

    half = (MAX_LENGTH - 2) // 2  # BOS + prompt + answer + EOS = max_length
    rows = 16 * BATCH
    with open(folder / "sft.jsonl", "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": words(half), "completion": words(MAX_LENGTH - 2 - half)}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for _ in range(rows):
            answer = MAX_LENGTH - 2 - half
            f.write(json.dumps({"prompt": words(half), "chosen": words(answer), "rejected": words(answer)}) + "\n")
    with open(folder / "prompts.jsonl", "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"prompt": words(MAX_LENGTH - 1)}) + "\n")
    return folder


def adapter_callbacks(adapter: str) -> list:
    """The callbacks of an `ADAPTERS` entry: none, LoRA or QLoRA at rank 16."""
    import lightning_align as la

    return {"none": [], "lora": [la.LoRA(r=16, alpha=32)], "qlora": [la.QLoRA(r=16, alpha=32)]}[adapter]


def constant_reward(prompts, completions):
    return [0.0 for _ in completions]


def child(size: str, method: str, adapter: str, devices: int = 1) -> dict:
    """One row in this process: the same run on a tiny model first (so the libraries' code that training runs is
    paged in before the baseline: a library's pages are not the run's memory), then the row's run, a few steps
    with MemoryReport; its plan and measure."""
    import gc

    import torch

    torch.set_num_threads(2 // devices or 1)
    fit(WARM_UP, method, adapter, 1, devices)
    gc.collect()
    return fit(size, method, adapter, STEPS, devices)


def fit(size: str, method: str, adapter: str, steps: int, devices: int = 1) -> dict:
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    import lightning_align as la

    folder = build_fixture(ROOT / f".fixture-memory-{size}", size)
    model = str(folder / "bf16" if adapter == "qlora" else folder)
    if method == "sft":
        # Every token scored, as the plan assumes for SFT (its upper bound: plain text, or prompts trained on).
        data = la.SFTDataModule(
            model, str(folder / "sft.jsonl"), batch_size=BATCH, max_length=MAX_LENGTH, train_on_prompt=True
        )
        module = la.SFTModule(model, learning_rate=1e-5)
    elif method in ("reward", "dpo"):
        data = la.PreferenceDataModule(model, str(folder / "pairs.jsonl"), batch_size=BATCH, max_length=MAX_LENGTH)
        module = (la.RewardModule if method == "reward" else la.DPOModule)(model, learning_rate=1e-5)
    else:
        data = la.PromptDataModule(model, str(folder / "prompts.jsonl"), batch_size=BATCH, max_length=MAX_LENGTH)
        module = la.PPOModule(
            model,
            reward=constant_reward,
            max_new_tokens=NEW_TOKENS,
            minibatch_size=BATCH,
            ppo_epochs=1,
            learning_rate=1e-5,
        )
    data.setup("fit")  # tokenised before the baseline
    report = la.MemoryReport()
    sharded = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    trainer = L.Trainer(
        accelerator="auto",
        devices=devices,
        strategy=sharded,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[report, *adapter_callbacks(adapter)],
        default_root_dir=tempfile.mkdtemp(dir=folder, prefix="out-"),
    )
    trainer.fit(module, datamodule=data)
    return {
        "planned": report.plan.peak,
        "parts": report.plan.parts,
        "measured": report.measured(trainer),
        "baseline": report.baseline,
        "device": trainer.strategy.root_device.type,
    }


# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so resident memory would also
# count memory the run no longer holds; a fixed 64 KiB threshold returns every tensor's block when it is freed.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def run_child(size: str, method: str, adapter: str, devices: int = 1) -> dict:
    command = [sys.executable, "-m", "benchmarks.memory", "--child", size, method, adapter, str(devices)]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | CHILD_ENV)
    if done.returncode != 0:
        raise RuntimeError(f"{size} {method} {adapter} failed:\n{done.stderr[-3000:]}")
    # Each process prints its own result (Lightning starts the others with the same command): the largest peak.
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return max(results, key=lambda result: result["measured"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = [size for size in SIZES if size != WARM_UP]
    parser.add_argument("--sizes", nargs="+", choices=sizes, default=sizes)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    parser.add_argument("--adapters", nargs="+", choices=ADAPTERS, default=ADAPTERS)
    parser.add_argument("--out", help="the table's file (default benchmarks/MEMORY.md, or MEMORY-GPU.md on a GPU)")
    parser.add_argument("--devices", type=int, default=1, help="processes to shard each row over (FSDP2)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, method, adapter, devices = args.child
        # One write (atomic below the pipe's buffer size): sharded, every process prints its result at once.
        os.write(1, (json.dumps(child(size, method, adapter, int(devices))) + "\n").encode())
        return
    rows, device = [], "cpu"
    for size in args.sizes:
        for method in args.methods:
            for adapter in args.adapters:
                result = run_child(size, method, adapter, args.devices)
                device = result["device"]
                error = result["measured"] / result["planned"] - 1
                rows.append((size, method, adapter, result, error))
                print(
                    f"{size} {method} {adapter}: planned {result['planned'] / 2**20:.0f} MiB, measured "
                    f"{result['measured'] / 2**20:.0f} MiB ({error:+.1%})",
                    flush=True,
                )
    lines = [
        f"Measured by `python -m benchmarks.memory{f' --devices {args.devices}' if args.devices > 1 else ''}` on "
        f"{date.today()} ({device}): micro-batch {BATCH}{' per process' if args.devices > 1 else ''}, rows of "
        f"{MAX_LENGTH} tokens (PPO: + {NEW_TOKENS} generated), {STEPS} steps, fp32 weights (QLoRA: NF4 body, "
        "bfloat16 compute). Measured: "
        + (
            "max_memory_allocated."
            if device == "cuda"
            else "peak resident memory above the baseline (the process just before `fit`: libraries, data)."
        ),
        "",
        "| size | method | adapter | planned MiB | measured MiB | error | baseline MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for size, method, adapter, result, error in rows:
        lines.append(
            f"| {size} | {method} | {adapter} | {result['planned'] / 2**20:.0f} | {result['measured'] / 2**20:.0f} "
            f"| {error:+.1%} | {result['baseline'] / 2**20:.0f} |"
        )
    worst = max(rows, key=lambda row: abs(row[4]))
    lines += ["", f"Worst row: {worst[0]} {worst[1]} {worst[2]}, {worst[4]:+.1%}."]
    text = "\n".join(lines)
    out = Path(args.out) if args.out else ROOT / ("MEMORY-GPU.md" if device == "cuda" else "MEMORY.md")
    title, sharded = "# Memory plan against measured peaks\n\n", "\n## Sharded"
    existing = out.read_text() if out.exists() else title
    if args.devices > 1:  # a section of its own, after the one-process table
        heading = f"{sharded}: FSDP2 over {args.devices} processes"
        before, _, after = existing.partition(heading)
        rest = after[after.find(sharded) :] if sharded in after else ""
        out.write_text(before.rstrip() + "\n" + heading + "\n\n" + text + "\n" + rest)
    else:  # the sharded sections stay
        out.write_text(title + text + "\n" + existing[existing.find(sharded) :] if sharded in existing else "")
    print("\n" + text)


if __name__ == "__main__":
    main()
