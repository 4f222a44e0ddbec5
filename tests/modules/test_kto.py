"""KTOModule: the loss of a batch from its real and mismatched rows, the reference, the class-balance warning,
and that it raises the held-out reward margin of desirable over undesirable answers, with each adapter."""

import lightning as L
import pytest
import torch

from lightning_align import KTOModule, LoRA, QLoRA, UnpairedPreferenceDataModule
from lightning_align.losses import kto_kl, kto_loss
from lightning_align.scoring.rows import response_logps
from tests.conftest import TEST_SEED, ready, report_gain, trainer, write_jsonl


def feedback_data(model_path, task_files, batch_size=16):
    dm = UnpairedPreferenceDataModule(
        model_path, task_files["preference_train"], task_files["preference_val"], batch_size=batch_size, max_length=64
    )
    dm.setup("fit")
    return dm


def test_a_batch_loss_uses_the_mismatched_rows_for_the_reference_point(sft_model, task_files, tmp_path):
    dm = feedback_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    module = ready(KTOModule(sft_model, beta=0.2, desirable_weight=1.2), [LoRA(r=4)], tmp_path)
    for p in module.model.parameters():  # an adapter away from zero: policy and reference differ
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    assert module.reference.kind == "adapter-disabled base"
    with torch.no_grad():
        out = module.kto_step(batch)
        policy = response_logps(module.model.eval(), batch)
        with module.model.disable_adapter():
            ref = response_logps(module.model, batch)
    kl = kto_kl(policy[8:], ref[8:])
    expected, _ = kto_loss(policy[:8], ref[:8], batch["desirable"], kl, 0.2, 1.2, 1.0)
    torch.testing.assert_close(out["kl"], kl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["losses"], expected, rtol=1e-4, atol=1e-5)


def test_mismatched_rows_take_a_completion_from_another_source_row(sft_model, task_files):
    dm = feedback_data(sft_model, task_files)
    examples = dm.train_set[:6]
    assert examples[0]["row"] == examples[1]["row"]  # a preference pair split into two examples
    batch = dm.collate(examples)
    for i, e in enumerate(examples):
        mismatched = batch["input_ids"][6 + i][batch["attention_mask"][6 + i].bool()].tolist()
        assert mismatched[: e["prompt_length"]] == e["input_ids"][: e["prompt_length"]]
        partner = examples[(i - 1 - i % 2) % 6]  # a rejected half (odd i) skips its own pair's chosen half
        assert mismatched[e["prompt_length"] :] == partner["input_ids"][partner["prompt_length"] :]


def test_precomputed_reference_gives_the_same_loss_and_releases_the_network(sft_model, task_files, tmp_path):
    dm = feedback_data(sft_model, task_files)
    pre = KTOModule(sft_model, precompute_ref_logps=True, learning_rate=0.0)
    trainer(tmp_path, max_steps=1).fit(pre, datamodule=dm)
    assert pre.reference is None
    assert all("ref_logps" in e and "kl_completion" in e for e in dm.train_set + dm.val_set)
    live = ready(KTOModule(sft_model), [], tmp_path / "live")
    torch.manual_seed(0)
    for p in live.model.parameters():  # a policy away from the reference, so the loss is not its starting value
        p.data.add_(0.01 * torch.randn_like(p))
    pre.model.load_state_dict(live.model.state_dict())
    batch = dm.collate(dm.train_set[3:11])  # fixed KL completions: the same rows as when they were scored
    assert "ref_logps" in batch and "ref_kl_logps" in batch
    unscored = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    with torch.no_grad():
        precomputed = pre.kto_step(batch)
        computed = live.kto_step(unscored)
        ref_logps, ref_kl_logps = live.reference_logps(unscored)
    torch.testing.assert_close(precomputed["kl"], computed["kl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(precomputed["losses"], computed["losses"], rtol=1e-4, atol=1e-5)
    # The KL point itself is clamped at 0 (often 0 here): its inputs, the mismatched rows' scores, are compared too.
    torch.testing.assert_close(batch["ref_kl_logps"], ref_kl_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batch["ref_logps"], ref_logps, rtol=1e-4, atol=1e-4)
    assert (ref_kl_logps < -1).all()  # real scores of real rows, not zeros


def test_a_class_balance_outside_the_papers_range_is_warned_with_the_weight_that_fixes_it(tiny_model, tmp_path):
    rows = [{"prompt": "p\n", "completion": str(i), "label": i < 9} for i in range(12)]  # 9 desirable, 3 not
    dm = UnpairedPreferenceDataModule(tiny_model, write_jsonl(tmp_path / "feedback.jsonl", rows), batch_size=4)
    module = KTOModule(tiny_model)
    with pytest.warns(UserWarning, match=r"= 3.00, outside the range \[1, 4/3\].*desirable_weight=0.389"):
        trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)
    with pytest.raises(ValueError, match="needs desirable and undesirable examples"):
        module.check_balance(4, 0)


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("adapter", [None, "lora", "qlora"])
def test_kto_raises_the_heldout_reward_margin(adapter, sft_model, task_files, tmp_path):
    L.seed_everything(TEST_SEED)
    callbacks = {None: [], "lora": [LoRA(r=8)], "qlora": [QLoRA(r=8)]}[adapter]
    # (learning rate, batch size, steps): measured held-out margins 0.99 (full), 1.04 (LoRA), 2.03 (QLoRA); losses
    # 0.41, 0.43, 0.46 from 0.50.
    learning_rate, batch_size, steps = {None: (1e-4, 16, 100), "lora": (3e-3, 8, 60), "qlora": (1e-3, 16, 200)}[adapter]
    module = KTOModule(sft_model, learning_rate=learning_rate, warmup_steps=10)
    dm = feedback_data(sft_model, task_files, batch_size=batch_size)
    fit = trainer(tmp_path, max_steps=steps, limit_val_batches=8, callbacks=callbacks)
    fit.validate(module, datamodule=dm, verbose=False)
    before = {k: fit.callback_metrics[f"val/{k}"].item() for k in ("loss", "rewards/margins")}
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm, verbose=False)
    after = {k: fit.callback_metrics[f"val/{k}"].item() for k in ("loss", "rewards/margins")}
    report_gain(
        before["rewards/margins"], after["rewards/margins"], f"loss {before['loss']:.4f} -> {after['loss']:.4f}"
    )
    assert before["rewards/margins"] == 0  # the policy starts as its reference
    assert after["rewards/margins"] > 0.3 and after["loss"] < before["loss"] - 0.03
