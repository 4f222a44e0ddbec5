"""Exact resume: a run stopped mid-epoch and resumed from its Lightning checkpoint continues with the losses an
uninterrupted run has (same data order, optimiser, scheduler, random state, PPO's KL controller and value head)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_align import (
    DPOModule,
    LoRA,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from tests.conftest import trainer


class Recorder(L.Callback):
    def __init__(self, names):
        self.names, self.values = names, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        logged = getattr(module, "logged_rollout", None)  # online RL: each rollout batch's metrics
        metrics = logged if logged is not None else {k: v.item() for k, v in trainer.callback_metrics.items()}
        self.values.append([float(metrics[name]) for name in self.names])


def build(method, model, files, adapter):
    if method == "sft":
        dm = SFTDataModule(model, files["sft_train"], batch_size=8, max_length=64)
        return SFTModule(model, learning_rate=1e-3, warmup_steps=2), dm, ["train/loss"]
    if method in ("reward", "dpo"):
        dm = PreferenceDataModule(model, files["preference_train"], batch_size=8, max_length=64)
        if method == "reward":
            return RewardModule(model, learning_rate=1e-3, warmup_steps=2), dm, ["train/loss"]
        module = DPOModule(model, learning_rate=1e-4, warmup_steps=2, precompute_ref_logps=True)
        return module, dm, ["train/loss", "rewards/margins"]
    dm = PromptDataModule(model, files["prompts_train"], batch_size=8)
    module = PPOModule(
        model,
        reward="lightning_align.demos:task_reward",
        max_new_tokens=8,
        minibatch_size=8,
        ppo_epochs=1,
        learning_rate=1e-3,
        target_kl=0.5,
        kl_horizon=100,
    )  # an adaptive KL coefficient, so its state matters
    return module, dm, ["loss/policy", "loss/value", "reward/mean", "kl_coef"]


@pytest.mark.parametrize(
    "method, adapter",
    [("sft", None), ("sft", "lora"), ("reward", None), ("dpo", None), ("dpo", "lora"), ("ppo", None), ("ppo", "lora")],
)
def test_resuming_mid_epoch_continues_exactly_like_an_uninterrupted_run(
    sft_model, task_files, tmp_path, method, adapter
):
    def run(max_steps, ckpt_path=None):
        L.seed_everything(0)
        module, dm, names = build(method, sft_model, task_files, adapter)
        recorder = Recorder(names)
        callbacks = [recorder, ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)]
        callbacks += [LoRA(r=4, dropout=0.1)] if adapter else []  # dropout: the random state must be restored
        fit = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=callbacks)
        fit.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return recorder.values, module

    whole, uninterrupted = run(6)
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    resumed, module = run(6, ckpt_path=str(checkpoint))
    assert len(whole) == 6 and len(resumed) == 3
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole[3:]), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(uninterrupted.state_dict().items(), module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    if adapter:  # the checkpoint holds the trained weights, not the frozen base
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all("lora_" in name or "value_head" in name for name in state), [n for n in state if "lora_" not in n][
            :3
        ]
