"""ORPOModule: its loss is the chosen NLL plus lambda times the odds-ratio term, it needs no reference, and it
raises the held-out preference accuracy from a base model in one stage, with each adapter."""

import lightning as L
import pytest
import torch

from lightning_align import LoRA, ORPOModule, PreferenceDataModule, QLoRA
from lightning_align.losses import orpo_loss
from lightning_align.modules.dpo import chosen_rejected_logps
from tests.conftest import TEST_SEED, report_gain, trainer


def preference_data(model_path, task_files, batch_size=16):
    dm = PreferenceDataModule(
        model_path, task_files["preference_train"], task_files["preference_val"], batch_size=batch_size, max_length=64
    )
    dm.setup("fit")
    return dm


def test_the_loss_is_the_chosen_nll_plus_lambda_times_the_odds_ratio_term(tiny_model, task_files):
    dm = preference_data(tiny_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    module = ORPOModule(tiny_model, orpo_lambda=0.25)
    module.configure_model()
    assert module.reference is None
    module.model.eval()
    with torch.no_grad():
        chosen, rejected = chosen_rejected_logps(module.model, batch, average=True)
        metrics = module.preference_step(batch)
    odds_losses, log_odds = orpo_loss(chosen, rejected)
    torch.testing.assert_close(metrics["loss"], -chosen + 0.25 * odds_losses, rtol=1e-4, atol=1e-5)
    # TRL's metric names: log_odds_chosen the log odds ratio, log_odds_ratio its log sigmoid.
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        metrics["log_odds_ratio"], torch.nn.functional.logsigmoid(log_odds), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(metrics["rewards/chosen"], 0.25 * chosen, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["loss_type", "ref_model", "beta"])
def test_orpos_own_settings_are_refused(name):
    with pytest.raises(ValueError, match=f"ORPOModule sets {name} itself"):
        ORPOModule("any", **{name: "ipo" if name == "loss_type" else 0.3})


@pytest.mark.slow
@pytest.mark.learning
@pytest.mark.parametrize("adapter", [None, "lora", "qlora"])
def test_orpo_raises_heldout_preference_accuracy(adapter, tiny_model, sft_model, task_files, tmp_path):
    """In full from the base model (ORPO's single stage); with an adapter from the SFT model (a random tiny
    model's low-rank update learns too slowly to measure in a test)."""
    L.seed_everything(TEST_SEED)
    callbacks = {None: [], "lora": [LoRA(r=8)], "qlora": [QLoRA(r=8)]}[adapter]
    start = tiny_model if adapter is None else sft_model
    module = ORPOModule(start, learning_rate=3e-3 if adapter is None else 1e-2, warmup_steps=10)
    dm = preference_data(start, task_files)
    fit = trainer(tmp_path, max_steps=100, limit_val_batches=8, callbacks=callbacks)
    fit.validate(module, datamodule=dm, verbose=False)
    before = {name: fit.callback_metrics[f"val/{name}"].item() for name in ("rewards/accuracies", "log_odds_chosen")}
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm, verbose=False)
    after = {name: fit.callback_metrics[f"val/{name}"].item() for name in ("rewards/accuracies", "log_odds_chosen")}
    report_gain(before["rewards/accuracies"], after["rewards/accuracies"], f"log odds {after['log_odds_chosen']:.3f}")
    assert after["rewards/accuracies"] > before["rewards/accuracies"] + 0.08
    assert after["log_odds_chosen"] > before["log_odds_chosen"] + 0.5
