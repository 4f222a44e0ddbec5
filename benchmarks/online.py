"""Online RL benchmarks, each against TRL on the same model, prompts, reward, sampling and batch, in one run.

    python -m benchmarks.online                # both comparisons; prints them and writes their RESULTS.md sections
    python -m benchmarks.online --method grpo  # one of them

GRPO runs against TRL 1.16's `GRPOTrainer` (the `bench` extra). PPO runs against TRL 0.19.1's `PPOTrainer`, the
last TRL with PPO, in a virtual environment of its own that this script creates at `benchmarks/.venv-trl019`
(torch, transformers, accelerate and datasets at this environment's versions, TRL 0.19.1 unmodified). Each
framework runs in a process of its own, so its peak resident memory is its own.

Model: the Llama-shaped benchmark model of `benchmarks.compare` (32,000-token vocabulary, hidden 256, 4 layers:
about 20M parameters), random init, fp32 on CPU. Prompts: the benchmark rows' prompts cut to 32-128 tokens.
- GRPO, each step: 8 prompts x 4 samples of exactly 32 new tokens (EOS may not end one early, so both sides
  generate the same tokens), the reward `token_parity_reward`, GRPO's per-sequence loss, beta 0, one optimiser
  step per generation batch (neither side needs the old policy's log-probs), temperature 1.
- PPO, each iteration: 32 prompts, 64 sampled tokens each (temperature 0.7), one PPO epoch in mini-batches of 8
  (4 optimiser steps), KL coefficient 0.05, a separate value model and a reward model (both a sequence
  classifier built from the same config, random init; the critic starts from it).

Figures: medians over the timed iterations of seconds per iteration, split into generation (sampling, and for
GRPO the reward function) and the rest (scoring and learning); generated tokens per second; the decode bound
(the time of the decode steps' matrix products alone, at the same batch, measured here) and generation's
multiple of it; peak resident memory. For PPO also the compute floor of an iteration: the decode bound plus the
model FLOPs of the rest of its work at the fp32 matmul peak (`ppo_iteration_flops`), which no implementation on
this machine can beat, and each side's multiple of it.
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

from benchmarks import compare
from benchmarks.compare import ROOT, build_fixture, matmul_peak_flops, write_section

PROMPTS, GENERATIONS, NEW_TOKENS = 8, 4, 32
PPO_PROMPTS, PPO_NEW_TOKENS, PPO_MINIBATCH, PPO_TEMPERATURE, KL_COEF = 32, 64, 8, 0.7, 0.05
WARMUP_STEPS, TIMED_STEPS = 2, 6
TRL_PPO_VENV = ROOT / ".venv-trl019"


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


def grpo_module(folder: Path):
    """Our side of the GRPO comparison: every sample exactly NEW_TOKENS long."""
    from lightning_align import GRPOModule

    module = GRPOModule(
        str(folder),
        rewards=token_parity_reward,
        num_generations=GENERATIONS,
        max_new_tokens=NEW_TOKENS,
        learning_rate=1e-5,
        scoring_check="off",
    )
    module.sampling["min_new_tokens"] = NEW_TOKENS  # the same token count on both sides
    return module


def run_ours(folder: Path) -> list[dict]:
    steps = fit_timed(
        folder,
        grpo_module(folder),
        PROMPTS,
        WARMUP_STEPS + TIMED_STEPS,
        lambda stats: (stats["time/generate"] + stats["time/reward"], PROMPTS * GENERATIONS * NEW_TOKENS),
    )
    return steps[WARMUP_STEPS:]


def fit_timed(folder: Path, module, prompts: int, max_steps: int, generation, devices: int = 1) -> list[dict]:
    """Fit `module` on the benchmark prompts, timing each rollout batch: {"total", "generate", "tokens"} per batch,
    `generation(stats)` giving (generation seconds, generated tokens) from the module's logged rollout. With
    `devices` > 1, sharded over that many processes (FSDP2), the prompts split between them."""
    import lightning as L
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_align import PromptDataModule

    steps, started = [], [0.0]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            started[0] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            generate, tokens = generation(pl_module.logged_rollout)
            step = {"total": time.perf_counter() - started[0], "generate": generate, "tokens": tokens}
            steps.append(step | {"prompt_tokens": int(batch["attention_mask"].sum())})

    data = PromptDataModule(
        str(folder),
        str(prompt_file(folder)),
        batch_size=prompts // devices,
        max_length=256,
        apply_chat_template=False,
        shuffle=False,
    )
    L.seed_everything(0)
    sharded = ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1) if devices > 1 else "auto"
    L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=sharded,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Timer()],
        limit_val_batches=0,
    ).fit(module, datamodule=data)
    return steps


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


def reward_folder(folder: Path) -> Path:
    """A reward model for PPO (and its critic's start): a sequence classifier of the policy's config, random init."""
    path = folder / "reward"
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

        config = AutoConfig.from_pretrained(folder)
        config.num_labels = 1
        torch.manual_seed(1)
        LlamaForSequenceClassification(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(folder).save_pretrained(path)
    return path


def decode_bound(model, rows: int, new_tokens: int, repeats: int = 3) -> float:
    """Seconds of the matrix products alone of `new_tokens` decode steps of `rows` sequences: every linear layer
    (the output layer included) applied to one token per row, per step. Attention over the cache, sampling and
    everything else come on top, so no decoder can be faster than this."""
    import torch
    from torch import nn

    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(new_tokens):
                for w, x in zip(weights, inputs):
                    x @ w.T
            best = min(best, time.perf_counter() - started)
    return best


def run_ours_ppo(folder: Path) -> list[dict]:
    from lightning_align import PPOModule

    reward = str(reward_folder(folder))
    module = PPOModule(
        str(folder),
        reward=reward,
        critic=reward,
        max_new_tokens=PPO_NEW_TOKENS,
        temperature=PPO_TEMPERATURE,
        ppo_epochs=1,
        minibatch_size=PPO_MINIBATCH,
        kl_coef=KL_COEF,
        learning_rate=1e-6,
        scoring_check="off",
    )
    steps = fit_timed(
        folder,
        module,
        PPO_PROMPTS,
        (WARMUP_STEPS + TIMED_STEPS) * PPO_PROMPTS // PPO_MINIBATCH,
        lambda stats: (stats["time/generate"], stats["response_length"] * PPO_PROMPTS),
    )
    steps = steps[WARMUP_STEPS:]
    bound = decode_bound(module.model, PPO_PROMPTS, PPO_NEW_TOKENS)
    peak = matmul_peak_flops()
    for step in steps:
        step["bound"] = bound
        step["floor"] = bound + ppo_iteration_flops(step["prompt_tokens"], step["tokens"]) / peak
    return steps


def ppo_iteration_flops(prompt_tokens: int, response_tokens: int) -> float:
    """Model FLOPs of the work a PPO iteration must do besides the decode steps (which `decode_bound` times), the
    same on both sides: the prompts' prefill, no-grad forwards of the reward model, the value model and the
    reference, then one epoch of learning (3 forwards' worth) for the policy and the value model. Each pass costs
    2 x N_body per real token (the blocks' matrices), plus 2 x N_head per response token where it has the output
    layer (policy, reference), and attention, normalisation and the optimiser come on top."""
    n_body, n_head = compare.body_parameters(), compare.VOCAB * compare.HIDDEN
    tokens = prompt_tokens + response_tokens
    body_passes = 1 + 1 + 1 + 3 + 3  # reward model, value model, reference; learning: policy, value model
    return 2 * n_body * (prompt_tokens + body_passes * tokens) + 2 * n_head * response_tokens * (1 + 3)


def run_trl_ppo(folder: Path) -> list[dict]:
    import datasets
    import trl.trainer.ppo_trainer as ppo_trainer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import PPOConfig, PPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    rows = [{"input_ids": tokenizer(json.loads(line)["prompt"])["input_ids"]} for line in open(prompt_file(folder))]
    dataset = datasets.Dataset.from_list(rows)
    config = PPOConfig(
        output_dir=str(folder / "trl-ppo"),
        per_device_train_batch_size=PPO_MINIBATCH,
        gradient_accumulation_steps=PPO_PROMPTS // PPO_MINIBATCH,
        num_mini_batches=PPO_PROMPTS // PPO_MINIBATCH,
        num_ppo_epochs=1,
        response_length=PPO_NEW_TOKENS,
        temperature=PPO_TEMPERATURE,
        kl_coef=KL_COEF,
        total_episodes=PPO_PROMPTS * (WARMUP_STEPS + TIMED_STEPS),
        learning_rate=1e-6,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        stop_token="eos",
        local_rollout_forward_batch_size=PPO_PROMPTS,
        seed=0,
        num_sample_generations=0,
        logging_steps=1,
        dataloader_num_workers=0,
    )
    reward = reward_folder(folder)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(folder),
        ref_model=AutoModelForCausalLM.from_pretrained(folder),
        reward_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(reward, num_labels=1),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    generation = [0.0, 0]
    original = ppo_trainer.batch_generation

    def timed(*args, **kwargs):
        begun = time.perf_counter()
        out = original(*args, **kwargs)
        generation[0] += time.perf_counter() - begun
        generation[1] = int((out[0][:, args[1].shape[1] :] != tokenizer.pad_token_id).sum())
        return out

    ppo_trainer.batch_generation = timed
    steps, last = [], [time.perf_counter()]

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            steps.append({"total": now - last[0], "generate": generation[0], "tokens": generation[1]})
            last[0], generation[0] = now, 0.0

    trainer.add_callback(Timer())
    trainer.train()
    return steps[WARMUP_STEPS:]


RUNNERS = {
    ("grpo", "ours"): run_ours,
    ("grpo", "trl"): run_trl,
    ("ppo", "ours"): run_ours_ppo,
    ("ppo", "trl"): run_trl_ppo,
}


def child(method: str, framework: str) -> dict:
    folder = build_fixture(ROOT / ".fixture")
    steps = RUNNERS[method, framework](folder)
    median = {key: statistics.median(step[key] for step in steps) for key in ("total", "generate", "tokens")}
    result = {
        "seconds": median["total"],
        "generate": median["generate"],
        "rest": median["total"] - median["generate"],
        "tokens_per_sec": median["tokens"] / median["generate"],
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps": len(steps),
    }
    for key in ("bound", "floor"):
        if key in steps[0]:
            result[key] = statistics.median(step[key] for step in steps)
    return result


def trl_ppo_python() -> str:
    """The Python of a virtual environment with TRL 0.19.1 beside this environment's torch and transformers."""
    python = TRL_PPO_VENV / "bin" / "python"
    if not python.exists():
        import importlib.metadata as metadata

        subprocess.run([sys.executable, "-m", "venv", str(TRL_PPO_VENV)], check=True)
        pins = [f"{name}=={metadata.version(name)}" for name in ("torch", "transformers", "accelerate", "datasets")]
        pins[0] = pins[0].split("+")[0]  # the local build tag (+cpu) is not part of the index's version
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pins], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "trl==0.19.1"], check=True)
    return str(python)


def table(method: str, ours: dict, trl: dict) -> str:
    peer = "TRL 1.16" if method == "grpo" else "TRL 0.19.1"
    if method == "grpo":
        what = (
            f"GRPO, {PROMPTS} prompts x {GENERATIONS} samples x {NEW_TOKENS} new tokens per step, one optimiser "
            "step each"
        )
    else:
        what = (
            f"PPO with a separate value model, {PPO_PROMPTS} prompts x {PPO_NEW_TOKENS} sampled tokens per "
            f"iteration, one epoch in mini-batches of {PPO_MINIBATCH}"
        )
    lines = [
        f"{what}; fp32 CPU, medians of {ours['steps']} iterations after {WARMUP_STEPS} warm-up ones "
        "(`python -m benchmarks.online`).",
        "",
        "| | s / iteration | generation s | scoring + learning s | generated tokens/s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in (("lightning-align", ours), (peer, trl)):
        lines.append(
            f"| {name} | {r['seconds']:.2f} | {r['generate']:.2f} | {r['rest']:.2f} | {r['tokens_per_sec']:.0f} | "
            f"{r['peak_mib']:.0f} |"
        )
    lines.append(
        f"| ratio ({peer} / ours) | {trl['seconds'] / ours['seconds']:.2f}x "
        f"| {trl['generate'] / ours['generate']:.2f}x "
        f"| {trl['rest'] / ours['rest']:.2f}x | | {trl['peak_mib'] / ours['peak_mib']:.2f}x |"
    )
    if "bound" in ours:
        lines += [
            "",
            f"Decode bound (the decode steps' matrix products alone, {PPO_PROMPTS} rows x {PPO_NEW_TOKENS} steps): "
            f"{ours['bound']:.2f} s; our generation takes {ours['generate'] / ours['bound']:.1f}x that.",
        ]
    if "floor" in ours:
        lines += [
            "",
            f"Compute floor of an iteration (the decode bound, plus the model FLOPs of the prefill, the reward model's,"
            f" value model's and reference's forwards and one epoch of learning for the policy and the value model, "
            f"at the fp32 matmul peak measured in the same run; see `ppo_iteration_flops`): {ours['floor']:.2f} s. "
            f"Ours takes {ours['seconds'] / ours['floor']:.2f}x the floor, {peer} "
            f"{trl['seconds'] / ours['floor']:.2f}x; 3x {peer}'s speed would be {trl['seconds'] / 3:.2f} s, "
            f"{trl['seconds'] / 3 / ours['floor']:.2f}x the floor.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["grpo", "ppo"], help="one comparison (default: both)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.method, args.child)))
        return
    folder = build_fixture(ROOT / ".fixture")
    reward_folder(folder)  # built here: the TRL 0.19.1 environment only reads it
    for method in [args.method] if args.method else ["grpo", "ppo"]:
        results = {}
        for framework in ("ours", "trl"):
            python = trl_ppo_python() if (method, framework) == ("ppo", "trl") else sys.executable
            done = subprocess.run(
                [python, "-m", "benchmarks.online", "--method", method, "--child", framework],
                capture_output=True,
                text=True,
                cwd=ROOT.parent,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(f"{method} / {framework} failed:\n{done.stderr[-3000:]}")
            results[framework] = json.loads(lines[-1][len("RESULT ") :])
        text = table(method, results["ours"], results["trl"])
        print(text + "\n")
        write_section("GRPO against TRL" if method == "grpo" else "PPO against TRL 0.19.1", text)


if __name__ == "__main__":
    main()
