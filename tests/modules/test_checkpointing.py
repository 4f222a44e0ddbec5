"""Selective activation checkpointing: on every family of the architecture grid, the loss and gradients of the
fast scoring path equal those without checkpointing (dropout on, so the rerun must draw the same masks), while
it keeps fewer activations (planned: tests/test_plan.py); QLoRA keeps the module's kind of checkpointing."""

import pytest
import torch

from lightning_align import QLoRA, SFTModule
from lightning_align.data.collate import packed_collate
from lightning_align.modules.checkpointing import checkpointing_kwargs, checkpointing_mode, rerun_cheap_operators
from lightning_align.scoring.families import ARCHITECTURES
from tests.conftest import random_examples, ready

aten = torch.ops.aten


def loss_and_gradients(module, batch) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(1)  # the same dropout masks in every run
    loss = module.scored_loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return loss.detach(), grads


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_selective_checkpointing_gives_the_gradients_of_none(name, model_folders, tmp_path):
    results = {}
    for setting in (False, "selective", True):
        module = ready(SFTModule(model_folders(name), gradient_checkpointing=setting), tmp_path=tmp_path / str(setting))
        assert module.model.training and module.model.is_gradient_checkpointing == bool(setting)
        batch = packed_collate(random_examples(module.model.config.vocab_size))
        results[setting] = loss_and_gradients(module, batch)
    loss, grads = results[False]
    assert len(grads) > 4
    for setting in ("selective", True):
        torch.testing.assert_close(results[setting][0], loss, rtol=1e-6, atol=1e-6)
        assert results[setting][1].keys() == grads.keys()
        for n, g in grads.items():
            torch.testing.assert_close(results[setting][1][n], g, rtol=1e-5, atol=1e-6, msg=f"{setting}: {n}")


def test_selective_checkpointing_keeps_the_products_and_attention_not_the_element_wise_work(model_folders, tmp_path):
    """The policy keeps what matrix products and attention kernels computed and reruns element-wise and layout
    work. (How much less that holds than no checkpointing: tests/test_plan.py, by the planner's count.)"""
    from torch.utils.checkpoint import CheckpointPolicy

    assert rerun_cheap_operators(None, aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert rerun_cheap_operators(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == (
        CheckpointPolicy.MUST_SAVE
    )
    for op in (aten.mul.Tensor, aten.silu.default, aten.rsqrt.default, aten.cat.default, aten.transpose.int):
        assert rerun_cheap_operators(None, op) == CheckpointPolicy.PREFER_RECOMPUTE, op
    assert "context_fn" in checkpointing_kwargs("selective") and "context_fn" not in checkpointing_kwargs(True)


def test_an_unknown_setting_fails_at_once(model_folders):
    with pytest.raises(ValueError, match="gradient_checkpointing must be one of"):
        SFTModule(model_folders("llama"), gradient_checkpointing="some")
    assert checkpointing_mode("full") == checkpointing_mode(True) == "full" and checkpointing_mode(False) is None


def test_qlora_keeps_the_modules_kind_of_checkpointing(model_folders, tmp_path):
    """peft turns checkpointing on again while preparing a 4-bit model: with the module's own settings."""
    module = ready(SFTModule(model_folders("llama"), gradient_checkpointing="selective"), [QLoRA(r=4)], tmp_path)
    base = module.model.get_base_model()
    layer = base.model.layers[0]
    assert base.is_gradient_checkpointing
    checkpoint = layer._gradient_checkpointing_func
    assert checkpoint.keywords.get("use_reentrant") is False and "context_fn" in checkpoint.keywords
