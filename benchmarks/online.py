"""GRPO benchmark: lightning-align's `GRPOModule` against TRL's `GRPOTrainer` on the same model, prompts, reward
function, group size, completion length and batch, in one run.

    python -m benchmarks.online            # prints the table and writes its section of RESULTS.md

Needs the `bench` extra (TRL 1.16). Each framework runs in a process of its own, so its peak resident memory is
its own. Model: the Llama-shaped benchmark model of `benchmarks.compare` (32,000-token vocabulary, hidden 256,
4 layers), random init, fp32 on CPU. Prompts: the benchmark rows' prompts cut to 32-128 tokens. Each step: 8
prompts x 4 samples of exactly 32 new tokens (EOS is not allowed to end one early, so both sides generate the
same number of tokens), the reward of `token_parity_reward`, GRPO's per-sequence loss, beta 0, one optimiser step
per generation batch (so neither side needs the old policy's log-probs), temperature 1.

Figures: medians over the timed steps of seconds per step, split into generation (sampling, including the
reward) and the rest (scoring and learning); generated tokens per second of generation; peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.compare import ROOT, build_fixture, write_section

PROMPTS, GENERATIONS, NEW_TOKENS = 8, 4, 32
WARMUP_STEPS, TIMED_STEPS = 2, 6


def token_parity_reward(prompts, completions, **kwargs):
    """Share of completion words whose token number is even: a cheap, deterministic verifier-like reward."""
    scores = []
    for completion in completions:
        words = completion.split()
        scores.append(sum(int(w[1:]) % 2 == 0 for w in words if w[1:].isdigit()) / max(len(words), 1))
    return scores


def prompt_file(folder: Path) -> Path:
    path = folder / "grpo_prompts.jsonl"
    if not path.exists():
        with open(folder / "rows.jsonl") as rows, open(path, "w") as out:
            for i, line in enumerate(rows):
                words = json.loads(line)["prompt"].split()
                n = 32 + (i * 37) % 97  # 32-128 tokens
                out.write(json.dumps({"prompt": " ".join((words * 4)[:n])}) + "\n")
    return path


def run_ours(folder: Path) -> list[dict]:
    import lightning as L

    from lightning_align import GRPOModule, PromptDataModule

    steps = []
    module = GRPOModule(
        str(folder),
        rewards=token_parity_reward,
        num_generations=GENERATIONS,
        max_new_tokens=NEW_TOKENS,
        learning_rate=1e-5,
        scoring_check="off",
    )
    module.sampling["min_new_tokens"] = NEW_TOKENS  # the same token count on both sides
    started = [0.0]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            started[0] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats = pl_module.logged_rollout
            total = time.perf_counter() - started[0]
            generate = stats["time/generate"] + stats["time/reward"]
            steps.append({"total": total, "generate": generate, "tokens": PROMPTS * GENERATIONS * NEW_TOKENS})

    data = PromptDataModule(
        str(folder),
        str(prompt_file(folder)),
        batch_size=PROMPTS,
        max_length=256,
        apply_chat_template=False,
        shuffle=False,
    )
    L.seed_everything(0)
    L.Trainer(
        accelerator="cpu",
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        limit_val_batches=0,
    ).fit(module, datamodule=data)
    return steps[WARMUP_STEPS:]


def run_trl(folder: Path) -> list[dict]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    rows = [json.loads(line) for line in open(prompt_file(folder))]
    config = GRPOConfig(
        output_dir=str(folder / "trl-grpo"),
        per_device_train_batch_size=PROMPTS * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=NEW_TOKENS,
        learning_rate=1e-5,
        beta=0.0,
        loss_type="grpo",
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        temperature=1.0,
        seed=0,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(folder),
        reward_funcs=token_parity_reward,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(folder),
    )
    generation = [0.0]
    original = trainer._generate_and_score_completions

    def timed(*args, **kwargs):
        begun = time.perf_counter()
        out = original(*args, **kwargs)
        generation[0] += time.perf_counter() - begun
        return out

    trainer._generate_and_score_completions = timed
    steps, started = [], [0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            started[0], generation[0] = time.perf_counter(), 0.0

        def on_step_end(self, args, state, control, **kwargs):
            total = time.perf_counter() - started[0]
            steps.append({"total": total, "generate": generation[0], "tokens": PROMPTS * GENERATIONS * NEW_TOKENS})

    trainer.add_callback(Timer())
    trainer.train()
    return steps[WARMUP_STEPS:]


def child(framework: str) -> dict:
    folder = build_fixture(ROOT / ".fixture")
    steps = (run_ours if framework == "ours" else run_trl)(folder)
    median = {key: statistics.median(step[key] for step in steps) for key in ("total", "generate")}
    return {
        "seconds": median["total"],
        "generate": median["generate"],
        "rest": median["total"] - median["generate"],
        "tokens_per_sec": PROMPTS * GENERATIONS * NEW_TOKENS / median["generate"],
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": len(steps),
    }


def table(ours: dict, trl: dict) -> str:
    lines = [
        f"GRPO, {PROMPTS} prompts x {GENERATIONS} samples x {NEW_TOKENS} new tokens per step, fp32 CPU, medians of "
        f"{ours['steps']} steps after {WARMUP_STEPS} warm-up steps (`python -m benchmarks.online`).",
        "",
        "| | s / step | generation s | scoring + learning s | generated tokens/s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("lightning-align", ours), ("TRL 1.16", trl)):
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['generate']:.2f} | {r['rest']:.2f} | {r['tokens_per_sec']:.0f} | "
            f"{r['peak_mib']:.0f} |"
        )
    lines.append(
        f"| ratio (TRL / ours) | {trl['seconds'] / ours['seconds']:.2f}x | {trl['generate'] / ours['generate']:.2f}x "
        f"| {trl['rest'] / ours['rest']:.2f}x | | {trl['peak_mib'] / ours['peak_mib']:.2f}x |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child)))
        return
    results = {}
    for framework in ("ours", "trl"):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.online", "--child", framework], capture_output=True, text=True
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(f"{framework} failed:\n{done.stderr[-3000:]}")
        results[framework] = json.loads(lines[-1][len("RESULT ") :])
    text = table(results["ours"], results["trl"])
    print(text)
    write_section("GRPO against TRL", text)


if __name__ == "__main__":
    main()
