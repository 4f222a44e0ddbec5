"""Every module runs unchanged with no adapter, LoRA and QLoRA, in 32-true, bf16-mixed and bf16-true."""

import math

import pytest
import torch

from lightning_align import (
    DPOModule,
    GRPOModule,
    LoRA,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    QLoRA,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from tests.conftest import trainer

PRECISIONS = ["32-true", "bf16-mixed", "bf16-true"]
ADAPTERS = {"none": lambda: [], "lora": lambda: [LoRA(r=4)], "qlora": lambda: [QLoRA(r=4)]}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("module_class", [RewardModule, DPOModule])
def test_preference_modules_train_with_every_adapter_and_precision(
    tiny_model, task_files, tmp_path, module_class, adapter, precision
):
    dm = PreferenceDataModule(tiny_model, task_files["preference_train"], batch_size=4, max_length=64)
    module = module_class(tiny_model, learning_rate=1e-3)
    fit = trainer(tmp_path, max_steps=3, callbacks=ADAPTERS[adapter](), precision=precision)
    fit.fit(module, datamodule=dm)
    assert math.isfinite(fit.callback_metrics["train/loss"].item())
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(torch.isfinite(p).all() for p in trained)
    if module_class is DPOModule:
        expected = "frozen copy of the starting policy" if adapter == "none" else "adapter-disabled base"
        assert module.reference.kind == expected


# method: (module on the tiny model, prompts per batch, optimiser steps, metrics that must be finite)
ONLINE = {
    "ppo": (
        lambda model: PPOModule(model, reward="lightning_align.demos:task_reward", max_new_tokens=4, minibatch_size=4),
        4,
        4,
        ("loss/policy", "loss/value", "kl", "reward/mean"),
    ),
    "grpo": (
        lambda model: GRPOModule(
            model, rewards="lightning_align.demos:task_reward", num_generations=2, max_new_tokens=4
        ),
        2,
        2,
        ("loss", "reward/mean", "entropy"),
    ),
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("method", list(ONLINE))
def test_online_rl_trains_with_every_adapter_and_precision(
    tiny_model, task_files, tmp_path, method, adapter, precision
):
    build, batch_size, steps, metrics = ONLINE[method]
    module = build(tiny_model)
    fit = trainer(tmp_path, max_steps=steps, callbacks=ADAPTERS[adapter](), precision=precision)
    fit.fit(module, datamodule=PromptDataModule(tiny_model, task_files["prompts_train"], batch_size=batch_size))
    assert fit.global_step == steps
    for name in metrics:
        assert math.isfinite(module.logged_rollout[name]), name
    if method == "ppo":
        expected = "frozen copy of the starting policy" if adapter == "none" else "adapter-disabled base"
        assert module.reference.kind == expected


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_sft_trains_with_every_adapter_and_precision(tiny_model, task_files, tmp_path, adapter, precision):
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=64)
    module = SFTModule(tiny_model, learning_rate=1e-3)
    fit = trainer(tmp_path, max_steps=3, callbacks=ADAPTERS[adapter](), precision=precision)
    fit.fit(module, datamodule=dm)
    assert math.isfinite(fit.callback_metrics["train/loss"].item())
    assert all(torch.isfinite(p).all() for p in module.parameters() if p.requires_grad)


def test_frozen_reference_and_reward_model_follow_the_policy_into_bf16_true(sft_model, task_files, tmp_path):
    from lightning_align import RewardModule as Reward

    reward_model = Reward(sft_model)
    reward_model.configure_model()
    folder = str(reward_model.save_pretrained(tmp_path / "rm"))
    dpo = DPOModule(sft_model)
    trainer(tmp_path, max_steps=1, precision="bf16-true").fit(
        dpo, datamodule=PreferenceDataModule(sft_model, task_files["preference_train"], batch_size=4, max_length=64)
    )
    assert next(dpo.model.parameters()).dtype == torch.bfloat16
    assert next(dpo.reference.network.parameters()).dtype == torch.bfloat16
    ppo = PPOModule(sft_model, reward=folder, max_new_tokens=4, minibatch_size=4)
    trainer(tmp_path, max_steps=1, precision="bf16-true").fit(
        ppo, datamodule=PromptDataModule(sft_model, task_files["prompts_train"], batch_size=4)
    )
    assert next(ppo.rewards.functions[0].module.model.parameters()).dtype == torch.bfloat16
