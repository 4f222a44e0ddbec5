"""RewardModule: learning to rank the demo pairs, scoring text, LoRA keeps the score head, HF export."""

import lightning as L
import pytest
import torch

from lightning_align import LoRA, PreferenceDataModule, RewardModule
from tests.conftest import TEST_SEED, ready, report_gain, trainer


def preference_data(model_path, task_files, batch_size=16):
    return PreferenceDataModule(
        model_path, task_files["preference_train"], task_files["preference_val"], batch_size=batch_size, max_length=64
    )


@pytest.mark.slow
@pytest.mark.learning
def test_reward_model_reaches_clearly_above_chance_heldout_pair_accuracy(sft_model, task_files, tmp_path):
    L.seed_everything(TEST_SEED)  # the new score head
    dm = preference_data(sft_model, task_files)
    module = RewardModule(sft_model, learning_rate=1e-3, warmup_steps=20)
    fit = trainer(tmp_path, max_steps=500)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/accuracy"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = fit.callback_metrics["val/accuracy"].item()
    report_gain(before, after)
    assert after > 0.65 and after > before + 0.1
    assert fit.callback_metrics["val/margin"] > 0


def test_score_matches_the_training_forward_and_export_loads_as_sequence_classifier(sft_model, task_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    dm = preference_data(sft_model, task_files, batch_size=4)
    module = RewardModule(sft_model, learning_rate=1e-3)
    trainer(tmp_path, max_steps=3).fit(module, datamodule=dm)
    module.model.eval()
    rows = [line for line in open(task_files["preference_val"])][:4]
    import json

    rows = [json.loads(r) for r in rows]
    with torch.no_grad():
        chosen, rejected = module.rewards(dm.collate(dm.val_set[:4]))
    scored = module.score([r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    torch.testing.assert_close(scored, torch.cat([chosen, rejected]))
    module.save_pretrained(tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    batch = dm.collate(dm.val_set[:4])
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(out, torch.cat([chosen, rejected]))


def test_reward_model_with_lora_trains_and_saves_its_score_head(sft_model, task_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    dm = preference_data(sft_model, task_files, batch_size=4)
    module = RewardModule(sft_model, learning_rate=1e-2)
    trainer(tmp_path, max_steps=5, callbacks=[LoRA(r=4)]).fit(module, datamodule=dm)
    batch = dm.collate(dm.val_set[:4])
    module.model.eval()
    with torch.no_grad():
        trained = torch.cat(module.rewards(batch))
    base = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(out, trained)


@pytest.mark.parametrize(
    "adapter, checkpointing",
    [(None, False), ("lora", False), (None, True)],  # checkpointing: rows as long as the longest, sdpa block mask
)
def test_padding_free_rewards_and_gradients_equal_the_padded_forward(
    tiny_model, task_files, tmp_path, adapter, checkpointing
):
    dm = preference_data(tiny_model, task_files, batch_size=8)
    dm.setup("fit")
    batch = dm.collate(dm.val_set[:8])
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # there is padding to drop

    def rewards_and_grads(padding_free):
        torch.manual_seed(0)  # the same new score head (and LoRA init) both times
        module = RewardModule(tiny_model, padding_free=padding_free, gradient_checkpointing=checkpointing)
        ready(module, [LoRA(r=4)] if adapter else [], tmp_path)
        module.model.eval()
        chosen, rejected = module.rewards(batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return torch.cat([chosen, rejected]).detach(), grads

    packed, packed_grads = rewards_and_grads(True)
    padded, padded_grads = rewards_and_grads(False)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    assert packed_grads.keys() == padded_grads.keys() and len(packed_grads) > 2
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_left_padded_batches_take_the_padded_forward(tiny_model, task_files, tmp_path):
    from lightning_align.scoring.packing import right_padded

    dm = preference_data(tiny_model, task_files, batch_size=4)
    dm.setup("fit")
    batch = dm.collate(dm.val_set[:4])
    lengths = batch["attention_mask"].sum(1)
    left = {
        k: torch.stack([v[i].roll(int(v.shape[1] - n)) for i, n in enumerate(lengths)])
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask")
    }
    assert right_padded(batch["attention_mask"]) and not right_padded(left["attention_mask"])
    module = ready(RewardModule(tiny_model), tmp_path=tmp_path)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(**left).logits.squeeze(-1)
        torch.testing.assert_close(torch.cat(module.rewards(left)), expected)
