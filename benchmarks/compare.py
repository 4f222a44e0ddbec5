"""Training-step benchmark: lightning-align against TRL on the same model, rows, batch and precision, in one run.

    python -m benchmarks.compare --method dpo --peft lora      # one comparison, printed
    python -m benchmarks.compare --all                          # every comparison, written to RESULTS.md

Needs the `bench` extra (`pip install -e .[bench]`, which adds TRL). Each framework runs in a process of its own,
so its peak resident memory is its own. Model: a Llama-shaped model built from a config (32,000-token vocabulary,
hidden 256, 4 layers, 4 heads), random init with a fixed seed, fp32 on CPU. Data: synthetic rows whose prompt
and response lengths follow a skewed distribution (prompts 20-300 tokens, responses 10-400), written as text
for a word-level tokenizer whose every word is one token, so both frameworks see exactly the same tokens.

Figures: real (non-padding) training tokens per second over the timed steps (after warm-up steps), peak resident
memory, and model FLOPs utilisation = achieved model FLOP/s over the fp32 matmul peak measured at start.
Model FLOPs of a step: 6 N_body T + 6 N_head S for a training pass (forward + backward) and 2 N_body T + 2 N_head S
for each extra forward (the DPO reference), with T the real tokens, S the scored tokens (where a loss needs the
output layer: response tokens for SFT and DPO, none for the reward model, whose head is a scalar), N_body the
parameters of the transformer blocks and N_head those of the output layer (embeddings are lookups). Work beyond
this (logits of prompt positions, padding) is not model work and does not count. Attention's quadratic term is
left out (small at these lengths).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).parent
VOCAB, HIDDEN, LAYERS, HEADS = 32_000, 256, 4, 4
BATCH, MAX_LENGTH, ROWS = 8, 512, 96
WARMUP_STEPS, TIMED_STEPS = 2, 8
COMBINATIONS = [
    ("sft", "none"),
    ("sft", "lora"),
    ("reward", "none"),
    ("reward", "lora"),
    ("dpo", "none"),
    ("dpo", "lora"),
]


# ----- the shared fixture ----------------------------------------------------------------------------------------
def build_fixture(folder: Path) -> Path:
    """Model, tokenizer and rows in `folder` (built once)."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if (folder / "rows.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(len(specials), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)

    def words(low: int, high: int) -> str:
        n = min(high, max(low, int(rng.lognormvariate(4.3, 0.7))))  # skewed: most short, a long tail
        return " ".join(f"t{rng.randrange(4, VOCAB)}" for _ in range(n))

    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(ROWS):
            row = {"prompt": words(20, 300), "completion": words(10, 400)}
            row |= {"chosen": row["completion"], "rejected": words(10, 400)}
            f.write(json.dumps(row) + "\n")
    return folder


def row_tokens(folder: Path, method: str) -> tuple[float, float]:
    """(real, scored) tokens per row on average, as both frameworks feed them: prompt + response(s) + EOS, the
    prompt cut from the left first when longer than MAX_LENGTH."""
    rows = [json.loads(line) for line in open(folder / "rows.jsonl")]
    count = lambda text: len(text.split())  # noqa: E731  (one word, one token)
    sides = ("completion",) if method == "sft" else ("chosen", "rejected")
    real = scored = 0
    for r in rows:
        for side in sides:
            response = min(MAX_LENGTH, count(r[side]) + 1)
            real += min(MAX_LENGTH, count(r["prompt"]) + response)
            scored += response if method != "reward" else 0
    return real / len(rows), scored / len(rows)


def matmul_peak_flops(seconds: float = 2.0, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - started)


# ----- one framework, one method, in this process ----------------------------------------------------------------
class StepClock:
    def __init__(self):
        self.marks: list[float] = []

    def tick(self) -> None:
        self.marks.append(time.perf_counter())

    def timed_seconds(self) -> float:
        return self.marks[WARMUP_STEPS + TIMED_STEPS] - self.marks[WARMUP_STEPS]


def run_ours(folder: Path, method: str, peft: str) -> tuple[float, int]:
    import lightning as L

    import lightning_align as la

    L.seed_everything(0)
    model, rows = str(folder), str(folder / "rows.jsonl")
    if method == "sft":
        data = la.SFTDataModule(model, rows, batch_size=BATCH, max_length=MAX_LENGTH, packing=True)
        module = la.SFTModule(model, learning_rate=1e-5)
    else:
        data = la.PreferenceDataModule(model, rows, batch_size=BATCH, max_length=MAX_LENGTH)
        module = (
            la.RewardModule(model, learning_rate=1e-5)
            if method == "reward"
            else la.DPOModule(model, learning_rate=1e-6)
        )
    clock = StepClock()

    class Tick(L.Callback):
        def on_train_batch_start(self, *args):
            if not clock.marks:
                clock.tick()

        def on_train_batch_end(self, *args):
            clock.tick()

    callbacks = [Tick()] + ([la.LoRA(r=16, alpha=32)] if peft == "lora" else [])
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data)
    return clock.timed_seconds(), sum(p.numel() for p in module.model.parameters())


def run_trl(folder: Path, method: str, peft: str) -> tuple[float, int]:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    rows = datasets.load_dataset("json", data_files=str(folder / "rows.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    clock = StepClock()

    class Tick(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            if not clock.marks:
                clock.tick()

        def on_step_end(self, *args, **kwargs):
            clock.tick()

    common = dict(
        output_dir=str(folder / "trl-out"),
        per_device_train_batch_size=BATCH,
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        max_length=MAX_LENGTH,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        use_cpu=True,
        learning_rate=1e-5,
        seed=0,
    )
    peft_config = None
    if peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if method == "sft":
        model = AutoModelForCausalLM.from_pretrained(folder)
        data = rows.select_columns(["prompt", "completion"])
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    elif method == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        data = rows.map(
            lambda r: {"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]}
        )
        trainer = trl.RewardTrainer(
            model=model,
            args=trl.RewardConfig(**common),
            train_dataset=data.select_columns(["chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
        trainer = trl.DPOTrainer(
            model=model,
            args=trl.DPOConfig(**common),
            train_dataset=rows.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    trainer.train()
    return clock.timed_seconds(), sum(p.numel() for p in model.parameters())


def child(framework: str, method: str, peft: str) -> dict:
    import torch

    torch.set_num_threads(2)
    folder = build_fixture(ROOT / ".fixture")
    seconds, _ = (run_ours if framework == "ours" else run_trl)(folder, method, peft)
    # Rows are drawn in an order of each framework's own; the timed steps see TIMED_STEPS batches of the average.
    real, scored = row_tokens(folder, method)
    body = LAYERS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * 4 * HIDDEN)
    head = VOCAB * HIDDEN if method != "reward" else HIDDEN
    passes = 6 + (2 if method == "dpo" else 0)  # DPO: the reference's forward (adapter-disabled or frozen copy)
    step_flops = BATCH * passes * (body * real + head * scored)
    return {
        "tokens_per_sec": TIMED_STEPS * BATCH * real / seconds,
        "model_flops_per_sec": TIMED_STEPS * step_flops / seconds,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----- the comparison --------------------------------------------------------------------------------------------
def compare(method: str, peft: str, peak: float) -> dict:
    results = {}
    for framework in ("ours", "trl"):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.compare", "--child", framework, "--method", method, "--peft", peft],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{framework} {method} {peft} failed:\n{done.stderr[-3000:]}")
        results[framework] = json.loads(done.stdout.strip().splitlines()[-1])
    for r in results.values():
        r["mfu"] = r["model_flops_per_sec"] / peak
    ours, theirs = results["ours"], results["trl"]
    return {
        "method": method,
        "peft": peft,
        "ours": ours,
        "trl": theirs,
        "speed_ratio": ours["tokens_per_sec"] / theirs["tokens_per_sec"],
        "memory_ratio": ours["peak_mib"] / theirs["peak_mib"],
    }


def table(rows: list[dict], peak: float) -> str:
    import lightning
    import torch
    import transformers
    import trl

    lines = [
        f"Measured by `python -m benchmarks.compare --all` on {date.today()}: {platform.machine()}, "
        f"{platform.processor() or 'CPU'}, 2 threads, fp32; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}. Matmul peak {peak / 1e9:.1f} GFLOP/s.",
        f"Model: Llama-shaped, vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads; batch {BATCH}, "
        f"max length {MAX_LENGTH}, {WARMUP_STEPS} warm-up + {TIMED_STEPS} timed steps.",
        "",
        "| method | adapter | ours tokens/s | TRL tokens/s | speed ratio | ours peak MiB | TRL peak MiB | memory ratio "
        "| ours MFU | TRL MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {r['method']} | {r['peft']} | {o['tokens_per_sec']:.0f} | {t['tokens_per_sec']:.0f} | "
            f"{r['speed_ratio']:.2f}x | {o['peak_mib']:.0f} | {t['peak_mib']:.0f} | {r['memory_ratio']:.2f} | "
            f"{100 * o['mfu']:.1f}% | {100 * t['mfu']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sft", "reward", "dpo"], default="sft")
    parser.add_argument("--peft", choices=["none", "lora"], default="none")
    parser.add_argument("--all", action="store_true", help="every comparison, written to benchmarks/RESULTS.md")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.method, args.peft)))
        return
    import torch

    torch.set_num_threads(2)
    peak = matmul_peak_flops()
    rows = []
    for method, peft in COMBINATIONS if args.all else [(args.method, args.peft)]:
        rows.append(compare(method, peft, peak))
        print(table(rows[-1:], peak).splitlines()[-1], flush=True)
    text = table(rows, peak)
    print("\n" + text)
    results = ROOT / "RESULTS.md"
    if args.all:
        results.write_text("# Benchmark results\n\n" + text + "\n")
    elif results.exists():  # one combination re-measured: its row is replaced and the header says when
        lines = results.read_text().splitlines()
        key = f"| {args.method} | {args.peft} |"
        lines = [text.splitlines()[-1] if line.startswith(key) else line for line in lines]
        lines.insert(3, f"Row {args.method} / {args.peft} re-measured on {date.today()} (`--method --peft`).")
        results.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
