"""The progress bar counts optimiser steps up to max_steps: PPO takes several per rollout batch."""

from lightning_align import LoRA, PPOModule, PromptDataModule, StepProgressBar
from tests.conftest import trainer


def test_the_bar_counts_optimiser_steps_to_max_steps(tiny_model, task_files, tmp_path):
    bar = StepProgressBar()
    dm = PromptDataModule(tiny_model, task_files["prompts_train"], batch_size=8)
    module = PPOModule(tiny_model, reward=lambda prompts, completions: [0.0] * len(completions), max_new_tokens=4)
    fit = trainer(tmp_path, max_steps=3, callbacks=[bar, LoRA(r=4)], enable_progress_bar=True, limit_val_batches=0)
    fit.fit(module, datamodule=dm)
    # Two optimiser steps per rollout batch (ppo_epochs=2, one minibatch): the second batch stops after one.
    assert fit.global_step == 3 and fit.fit_loop.epoch_loop.batch_progress.current.completed == 2
    assert bar.train_progress_bar.total == 3 and bar.train_progress_bar.n == 3
    assert "-" not in bar.train_progress_bar.desc  # no "Epoch 0/-2"
