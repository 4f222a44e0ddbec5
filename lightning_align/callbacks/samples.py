"""A table of generated samples during training: prompts, completions and their scores."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lightning_align.data.sources import DataSource, read_rows
from lightning_align.modules.sampling import generate_completions


def prompt_text(fields: dict, tokenizer) -> str:
    """A row's prompt as the model sees it: plain text, or chat messages rendered up to the assistant's turn."""
    prompt = fields.get("prompt")
    if prompt is None and isinstance(fields.get("messages"), list):
        messages = fields["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
        prompt = messages[:last]
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return str(prompt)


def last_tokens(prompt: str, tokenizer, limit: int) -> str:
    """The prompt cut to its last `limit` tokens: a huge row must not become a huge generation."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt if len(ids) <= limit else tokenizer.decode(ids[-limit:])


class GenerationSamples(L.Callback):
    """Every `every_n_steps` training steps and at the end of training, greedy completions of a fixed set of
    prompts with their scores: a `wandb.Table` under `WandbLogger`, rows appended to `<log_dir>/samples.csv`
    under any other logger (or none). Only the first process writes.

    Args:
        prompts: a data source whose rows have a `prompt` (or chat `messages`); by default the module's
            validation data, or its training data if it has none.
        num_samples, max_new_tokens: how many prompts and how long the completions.
        max_prompt_tokens: prompts are cut to their last this many tokens (by default the data module's
            `max_length`, else 1024), as training data is.
        reward: `(prompts, completions) -> list[float]` or its `"package.module:function"` path; by default the
            module's own reward (PPO) and no score otherwise. It is tried on the prompts at setup, so a reward
            that cannot score them stops the run before training, not after.
    """

    def __init__(
        self,
        prompts: DataSource | None = None,
        every_n_steps: int = 100,
        num_samples: int = 8,
        max_new_tokens: int = 32,
        reward: str | None = None,
        max_prompt_tokens: int | None = None,
    ):
        if every_n_steps < 1 or num_samples < 1 or max_new_tokens < 1:
            raise ValueError(
                "GenerationSamples: every_n_steps, num_samples and max_new_tokens must be at least 1, got "
                f"{every_n_steps}, {num_samples}, {max_new_tokens}"
            )
        self.prompts_source, self.every_n_steps = prompts, every_n_steps
        self.num_samples, self.max_new_tokens, self.reward = num_samples, max_new_tokens, reward
        self.max_prompt_tokens = max_prompt_tokens
        self.prompts: list[str] | None = None
        self.csv_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        source = self.prompts_source
        datamodule = getattr(trainer, "datamodule", None)
        if source is None and datamodule is not None:
            source = datamodule.val_data if getattr(datamodule, "val_data", None) is not None else datamodule.train_data
        if source is None:
            raise ValueError("GenerationSamples needs `prompts`, or a datamodule whose data it can take them from")
        rows = read_rows(source)[: self.num_samples]
        limit = self.max_prompt_tokens or getattr(datamodule, "max_length", None) or 1024
        self.prompts = [
            last_tokens(prompt_text(row.fields, pl_module.tokenizer), pl_module.tokenizer, limit) for row in rows
        ]
        if self.reward is not None:
            try:
                self.scorer(pl_module)(self.prompts, [""] * len(self.prompts))
            except Exception as err:  # noqa: BLE001 - a user's function: say whose error it is, before training
                raise ValueError(
                    f"GenerationSamples: reward {self.reward!r} cannot score these prompts ({type(err).__name__}: "
                    f"{err}); give a reward for your data, or leave `reward` out to log samples without scores"
                ) from None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.log_samples(trainer, pl_module)

    def scorer(self, pl_module):
        if self.reward is not None:
            from lightning_align.modules.rewards import resolve_reward

            return resolve_reward(self.reward)[0]
        rewards = getattr(pl_module, "rewards", None)  # an online RL module's own rewards
        if rewards is None or rewards.functions is None:
            return None

        def combined(prompts, completions):  # the prompts here have no row fields: rewards that need them abstain
            try:
                return [None if s != s else s for s in rewards.combine(rewards.score(prompts, completions)).tolist()]
            except RuntimeError:
                return [None] * len(completions)

        return combined

    def log_samples(self, trainer: L.Trainer, pl_module) -> None:
        if not hasattr(pl_module.model, "generate"):
            rank_zero_warn(f"GenerationSamples: {type(pl_module.model).__name__} does not generate text; skipped")
            return
        completions = generate_completions(pl_module.model, pl_module.tokenizer, self.prompts, self.max_new_tokens)
        scorer = self.scorer(pl_module)
        scores = scorer(self.prompts, completions) if scorer is not None else [None] * len(completions)
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts: every process asks
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        rows = [[step, p, c, s] for p, c, s in zip(self.prompts, completions, scores)]
        columns = ["step", "prompt", "completion", "score"]
        from lightning.pytorch.loggers import WandbLogger

        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if wandb_loggers:
            wandb_loggers[0].log_table(key="samples", columns=columns, data=rows, step=step)
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "samples.csv"
        new = not self.csv_path.exists()
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(columns)
            writer.writerows(rows)
