"""Reward, DPO and PPO modules run unchanged with no adapter, LoRA and QLoRA, in 32-true and bf16-mixed."""

import math

import pytest
import torch

from lightning_align import DPOModule, LoRA, PPOModule, PreferenceDataModule, PromptDataModule, QLoRA, RewardModule
from tests.conftest import trainer

ADAPTERS = {"none": lambda: [], "lora": lambda: [LoRA(r=4)], "qlora": lambda: [QLoRA(r=4)]}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
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


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("adapter", list(ADAPTERS))
def test_ppo_trains_with_every_adapter_and_precision(tiny_model, task_files, tmp_path, adapter, precision):
    dm = PromptDataModule(tiny_model, task_files["prompts_train"], batch_size=4)
    module = PPOModule(tiny_model, reward="lightning_align.demos:task_reward", max_new_tokens=4, minibatch_size=4)
    fit = trainer(tmp_path, max_steps=4, callbacks=ADAPTERS[adapter](), precision=precision)
    fit.fit(module, datamodule=dm)
    for name in ("loss/policy", "loss/value", "kl", "reward/mean"):
        assert math.isfinite(fit.callback_metrics[name].item()), name
    expected = "frozen copy of the starting policy" if adapter == "none" else "adapter-disabled base"
    assert module.reference.kind == expected
