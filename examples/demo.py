"""The full demo on the bundled tiny model: SFT -> DPO, SFT -> reward model -> PPO (with LoRA), SFT -> GRPO
(against the task's verifier) and SFT -> GRPO with a calculator tool (multi-turn episodes), then a before/after
table and a PNG of the training curves.

Run with `make demo`. Everything is built locally (tiny Llama-style model, character tokenizer, task data);
nothing is downloaded. The SFT data mixes two answer styles ("123" and "Answer: 123"), as data pooled from
several sources does; the preference data and the task reward prefer the bare answer, which DPO, PPO and GRPO learn.
Logs go to runs/demo/<stage>/ as CSV and as offline W&B runs (`wandb sync` uploads them).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_align import (
    DPOModule,
    GRPOModule,
    LoRA,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from lightning_align.demos import task_accuracy, task_reward, tiny_model_path, write_task_data
from lightning_align.demos.tool_use import calculator_stage

RUN_DIR = Path("runs/demo")


def stage_trainer(name: str, max_steps: int, callbacks=(), log_every_n_steps: int = 10) -> L.Trainer:
    loggers = [
        CSVLogger(RUN_DIR, name=name, version=0),
        WandbLogger(project="lightning-align-demo", name=name, save_dir=str(RUN_DIR / name), offline=True),
    ]
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=loggers,
        log_every_n_steps=log_every_n_steps,
        limit_val_batches=4,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=RUN_DIR / name,
        callbacks=list(callbacks),
    )


def validated(trainer: L.Trainer, module, datamodule, names: list[str]) -> list[float]:
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return [trainer.callback_metrics[name].item() for name in names]


def main() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    L.seed_everything(0)
    model_path = str(tiny_model_path())
    data = write_task_data(RUN_DIR / "data", n_train=2000, n_val=200, verbose_share=0.5)
    held_out = [json.loads(line)["prompt"] for line in open(data["sft_val"])]
    rows = []

    # 1. SFT: learns the tasks, in both answer styles.
    sft_data = SFTDataModule(model_path, data["sft_train"], data["sft_val"], batch_size=32, max_length=64)
    sft = SFTModule(model_path, learning_rate=3e-3, warmup_steps=30)
    trainer = stage_trainer("sft", 600)
    sft.configure_model()
    before = [task_accuracy(sft.model, sft_data.tokenizer, held_out, any_style=True)]
    before += [task_accuracy(sft.model, sft_data.tokenizer, held_out)] + validated(trainer, sft, sft_data, ["val/loss"])
    trainer.fit(sft, datamodule=sft_data)
    after = [task_accuracy(sft.model, sft_data.tokenizer, held_out, any_style=True)]
    after += [task_accuracy(sft.model, sft_data.tokenizer, held_out)] + validated(trainer, sft, sft_data, ["val/loss"])
    # overwrite=True: each `make demo` replaces the exports of the one before (and nothing else in runs/demo)
    sft_path = str(sft.save_pretrained(RUN_DIR / "sft" / "export", overwrite=True))
    rows += [
        ("SFT", "task accuracy (either style)", before[0], after[0]),
        ("SFT", "bare answer, correct", before[1], after[1]),
        ("SFT", "validation loss", before[2], after[2]),
    ]

    # 2. DPO from the SFT model (full fine-tuning, frozen reference).
    pairs = PreferenceDataModule(
        sft_path, data["preference_train"], data["preference_val"], batch_size=16, max_length=64
    )
    dpo = DPOModule(sft_path, beta=0.1, rpo_alpha=1.0, learning_rate=1e-4, warmup_steps=10)
    trainer = stage_trainer("dpo", 150)
    dpo.configure_model()
    chosen_before = task_accuracy(dpo.model, pairs.tokenizer, held_out)
    accuracy_before = validated(trainer, dpo, pairs, ["val/rewards/accuracies"])[0]
    trainer.fit(dpo, datamodule=pairs)
    chosen_after = task_accuracy(dpo.model, pairs.tokenizer, held_out)
    accuracy_after = validated(trainer, dpo, pairs, ["val/rewards/accuracies"])[0]
    rows += [
        ("DPO", "preference accuracy (implicit reward)", accuracy_before, accuracy_after),
        ("DPO", "greedy answer is the chosen one", chosen_before, chosen_after),
    ]

    # 3. Reward model from the SFT model.
    reward_model = RewardModule(sft_path, learning_rate=1e-3)
    trainer = stage_trainer("reward", 300)
    before = validated(trainer, reward_model, pairs, ["val/accuracy"])[0]
    trainer.fit(reward_model, datamodule=pairs)
    after = validated(trainer, reward_model, pairs, ["val/accuracy"])[0]
    reward_path = str(reward_model.save_pretrained(RUN_DIR / "reward" / "export", overwrite=True))
    rows.append(("Reward model", "held-out pair accuracy", before, after))

    # 4. PPO from the SFT model with LoRA, against the trained reward model.
    prompts = PromptDataModule(
        sft_path, data["prompts_train"], data["prompts_val"], batch_size=32, apply_chat_template=False
    )  # the SFT stage trained on plain prompt/completion rows
    ppo = PPOModule(
        sft_path, reward=reward_path, max_new_tokens=12, kl_coef=0.1, whiten_scores=True, learning_rate=2e-3
    )
    adapter = LoRA(r=8, save_dir=str(RUN_DIR / "ppo" / "adapter"), overwrite=True)
    trainer = stage_trainer("ppo", 400, callbacks=[adapter], log_every_n_steps=1)  # one log per rollout batch
    score_before = validated(trainer, ppo, prompts, ["val/reward"])[0]
    task_before = mean_task_reward(ppo, prompts, held_out)
    trainer.fit(ppo, datamodule=prompts)
    score_after = validated(trainer, ppo, prompts, ["val/reward"])[0]
    task_after = mean_task_reward(ppo, prompts, held_out)
    rows += [
        ("PPO (LoRA)", "reward model score (mean)", score_before, score_after),
        ("PPO (LoRA)", "task reward (mean)", task_before, task_after),
    ]

    # 5. GRPO from the SFT model against the task's verifier: no reward model, no critic, no reference.
    grpo = GRPOModule(
        sft_path, rewards=task_reward, num_generations=8, max_new_tokens=12, minibatch_size=16, learning_rate=5e-4
    )
    group_prompts = PromptDataModule(
        sft_path, data["prompts_train"], data["prompts_val"], batch_size=8, apply_chat_template=False
    )
    trainer = stage_trainer("grpo", 240, log_every_n_steps=1)
    grpo.configure_model()
    accuracy_before = task_accuracy(grpo.model, group_prompts.tokenizer, held_out)
    task_before = mean_task_reward(grpo, group_prompts, held_out)
    trainer.fit(grpo, datamodule=group_prompts)
    accuracy_after = task_accuracy(grpo.model, group_prompts.tokenizer, held_out)
    task_after = mean_task_reward(grpo, group_prompts, held_out)
    rows += [
        ("GRPO", "bare answer, correct", accuracy_before, accuracy_after),
        ("GRPO", "task reward (mean)", task_before, task_after),
    ]

    # 6. Tool use: SFT on 4-digit sums whose traces call a calculator half of the time (and answer alone the other
    # half), then GRPO with the calculator; GRPO without it for comparison. Greedy episodes on unseen sums.
    tools = calculator_stage(
        sft_path, RUN_DIR / "tools", lambda name, steps: stage_trainer(name, steps, log_every_n_steps=5)
    )
    sft_tools, grpo_tools = tools["sft"], tools["grpo"]
    rows += [
        ("GRPO + calculator", "4-digit sums right", sft_tools["accuracy"], grpo_tools["accuracy"]),
        ("GRPO + calculator", "tool calls per episode", sft_tools["tool_calls"], grpo_tools["tool_calls"]),
        ("GRPO + calculator", "well-formed calls", sft_tools["well_formed"], grpo_tools["well_formed"]),
        (
            "GRPO without the tool",
            "4-digit sums right",
            tools["sft without the tool"]["accuracy"],
            tools["grpo without the tool"]["accuracy"],
        ),
    ]

    table = results_table(rows)
    print("\n" + table)
    (RUN_DIR / "results.md").write_text(table + "\n")
    plot = plot_curves(RUN_DIR / "curves.png")
    print(f"\nTraining curves: {plot}\nLogs: {RUN_DIR}/<stage>/ (CSV and offline W&B runs)")


def mean_task_reward(module, prompts: PromptDataModule, held_out: list[str]) -> float:
    from lightning_align.demos import generate_completions

    completions = generate_completions(module.model, prompts.tokenizer, held_out, max_new_tokens=12)
    return sum(task_reward(held_out, completions)) / len(held_out)


def results_table(rows) -> str:
    lines = ["| stage | held-out metric | before | after |", "|---|---|---:|---:|"]
    for stage, metric, before, after in rows:
        lines.append(f"| {stage} | {metric} | {before:.3f} | {after:.3f} |")
    return "\n".join(lines)


def plot_curves(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("sft", "train/loss", "SFT: loss"),
        ("dpo", "train/loss", "DPO: loss"),
        ("dpo", "rewards/accuracies", "DPO: reward accuracy"),
        ("reward", "train/loss", "Reward model: loss"),
        ("ppo", "train/reward/mean", "PPO: reward model score"),
        ("ppo", "train/kl", "PPO: KL to the reference"),
        ("grpo", "train/reward/mean", "GRPO: task reward of the samples"),
        ("grpo", "train/response_length", "GRPO: response length"),
    ]
    figure, axes = plt.subplots(2, 4, figsize=(17, 7))
    for axis, (stage, metric, title) in zip(axes.flat, panels):
        steps, values = [], []
        with open(RUN_DIR / stage / "version_0" / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get(metric):
                    steps.append(int(row["step"]))
                    values.append(float(row[metric]))
        axis.plot(steps, values)
        axis.set_title(title)
        axis.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return path


if __name__ == "__main__":
    main()
