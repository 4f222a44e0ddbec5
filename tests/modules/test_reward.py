"""RewardModule: learning to rank the demo pairs, scoring text, LoRA keeps the score head, HF export."""

import pytest
import torch

from lightning_align import LoRA, PreferenceDataModule, RewardModule
from tests.conftest import trainer


def preference_data(model_path, task_files, batch_size=16):
    return PreferenceDataModule(
        model_path, task_files["preference_train"], task_files["preference_val"], batch_size=batch_size, max_length=64
    )


@pytest.mark.slow
def test_reward_model_reaches_clearly_above_chance_heldout_pair_accuracy(sft_model, task_files, tmp_path):
    dm = preference_data(sft_model, task_files)
    module = RewardModule(sft_model, learning_rate=1e-3, warmup_steps=20)
    fit = trainer(tmp_path, max_steps=500)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/accuracy"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = fit.callback_metrics["val/accuracy"].item()
    print(f"reward model held-out pair accuracy {before:.3f} -> {after:.3f}")
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
