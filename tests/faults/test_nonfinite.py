"""A non-finite loss or gradient stops the run with the step and batch named, or skips the update and counts it."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_align import SFTDataModule, SFTModule
from tests.conftest import trainer


def poison_forward(module, at_call: int):
    """NaN hidden states out of the transformer body (so NaN logits, whichever way the output layer is applied)
    on the `at_call`-th training forward pass (1-based)."""
    calls = []

    def hook(model, args, kwargs, output):
        if model.training:
            calls.append(1)
            if len(calls) == at_call:
                output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    module.configure_model()
    module.model.model.register_forward_hook(hook, with_kwargs=True)


def data(tiny_model, plain_task_files):
    return SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=8, max_length=64)


def test_a_nan_loss_stops_the_run_naming_step_and_batch_and_keeps_the_last_checkpoint(
    tiny_model, plain_task_files, tmp_path
):
    module = SFTModule(tiny_model, learning_rate=1e-3)
    poison_forward(module, at_call=3)
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit = trainer(tmp_path, max_steps=6, enable_checkpointing=True, callbacks=[checkpoints])
    with pytest.raises(FloatingPointError, match=r"SFTModule: loss is nan at step 2, batch 2; stopping"):
        fit.fit(module, datamodule=data(tiny_model, plain_task_files))
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(t).all() for t in saved["state_dict"].values())


def test_with_skip_the_nan_step_is_skipped_counted_and_training_goes_on(tiny_model, plain_task_files, tmp_path):
    module = SFTModule(tiny_model, learning_rate=1e-3, nonfinite="skip")
    poison_forward(module, at_call=3)
    fit = trainer(tmp_path, max_steps=5, log_every_n_steps=1)
    fit.fit(module, datamodule=data(tiny_model, plain_task_files))
    assert fit.global_step == 5 and module.skipped_steps == 1
    assert fit.callback_metrics["train/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_a_non_finite_gradient_is_dropped_so_no_weight_moves(tiny_model, plain_task_files, tmp_path):
    module = SFTModule(tiny_model, learning_rate=1e-3, nonfinite="skip")
    module.configure_model()
    weight = module.model.model.layers[0].mlp.up_proj.weight
    weight.register_hook(lambda grad: grad * float("inf"))  # every step's gradient is infinite
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(module, datamodule=data(tiny_model, plain_task_files))
    assert module.skipped_steps >= 2
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown nonfinite policy 'ignore'; valid: stop, skip"):
        SFTModule("any", nonfinite="ignore")


def test_huge_but_finite_gradients_pass_the_check_and_one_nan_among_them_does_not(tiny_model):
    module = SFTModule(tiny_model)
    module.configure_model()
    params = list(module.parameters())
    for p in params:
        p.grad = torch.full_like(p, 1e30)
    # The check's first pass, the total norm, overflows here: the answer must come from the per-gradient check.
    assert not torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))
    assert module.gradients_finite()
    params[-1].grad.view(-1)[-1] = float("nan")
    with pytest.raises(FloatingPointError, match="a gradient is not finite at step 0"):
        module.gradients_finite()
