"""Stages that start from an existing adapter: the reference is the model the stage started from, and resume
restores the trained adapter."""

import math

import pytest
import torch

from lightning_align import DPOModule, LoRA, PPOModule, PreferenceDataModule, QLoRA, RewardModule, SFTModule
from lightning_align.modules.dpo import chosen_rejected_logps
from tests.conftest import ready, trainer


def preference_batch(tiny_model, task_files, n=8):
    dm = PreferenceDataModule(tiny_model, task_files["preference_train"], task_files["preference_val"], max_length=64)
    dm.setup("fit")
    return dm, dm.collate(dm.val_set[:n])


def sft_model_logps(tiny_model, adapter, batch):
    """Log-probs of the SFT model itself: the base with its adapter, loaded apart from any module."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    with torch.no_grad():
        return chosen_rejected_logps(model, batch)


@pytest.mark.parametrize("mode, kind", [("continue", "frozen start adapter"), ("merge", "adapter-disabled base")])
def test_dpo_from_an_sft_adapter_has_the_sft_model_as_reference(
    tiny_model, sft_adapter, task_files, tmp_path, mode, kind
):
    dm, batch = preference_batch(tiny_model, task_files)
    sft = sft_model_logps(tiny_model, sft_adapter, batch)
    module = ready(DPOModule(tiny_model), [LoRA(r=4, init_adapter=sft_adapter, init_mode=mode)], tmp_path)
    assert module.reference.kind.startswith(kind) and module.reference.network is None
    with torch.no_grad():
        reference = module.reference_logps(batch)
        policy = chosen_rejected_logps(module.model, batch)
        first_loss = module.preference_step(batch)["loss"]
    for ref, pol, expected in zip(reference, policy, sft):
        torch.testing.assert_close(ref, expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(pol, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(first_loss, torch.full_like(first_loss, math.log(2)), rtol=0, atol=1e-5)
    # One copy of the base weights; under "continue" a frozen copy of the start adapter beside the trained one.
    from transformers import AutoModelForCausalLM

    named = dict(module.model.named_parameters())
    base = sum(p.numel() for n, p in named.items() if "lora_" not in n)
    assert base == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    start = [p for n, p in named.items() if ".start." in n]
    assert (len(start) > 0) == (mode == "continue") and not any(p.requires_grad for p in start)


def test_training_from_an_sft_adapter_keeps_the_reference_fixed_and_saves_only_the_trained_adapter(
    tiny_model, sft_adapter, task_files, tmp_path
):
    from peft import PeftConfig

    dm, batch = preference_batch(tiny_model, task_files)
    sft = sft_model_logps(tiny_model, sft_adapter, batch)
    module = DPOModule(tiny_model, learning_rate=1e-2)
    lora = LoRA(init_adapter=sft_adapter, save_dir=str(tmp_path / "dpo-adapter"))
    trainer(tmp_path, max_steps=5, callbacks=[lora]).fit(module, datamodule=dm)
    with torch.no_grad():
        reference = module.reference_logps(batch)
        policy = chosen_rejected_logps(module.model, batch)
    torch.testing.assert_close(reference[0], sft[0], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(policy[0], sft[0], atol=1e-3)  # the continued adapter trained
    assert [p.name for p in (tmp_path / "dpo-adapter").iterdir() if p.is_dir()] == []  # no start/ beside it
    assert PeftConfig.from_pretrained(tmp_path / "dpo-adapter").r == 4  # the SFT adapter's own rank, continued


def test_qlora_dpo_from_an_sft_adapter_starts_at_log_2_near_the_full_precision_sft_model(
    tiny_model, sft_adapter, task_files, tmp_path
):
    dm, batch = preference_batch(tiny_model, task_files)
    sft = sft_model_logps(tiny_model, sft_adapter, batch)
    module = ready(DPOModule(tiny_model), [QLoRA(init_adapter=sft_adapter, compute_dtype="float32")], tmp_path)
    assert module.reference.kind == "frozen start adapter"
    with torch.no_grad():
        reference = module.reference_logps(batch)
        first_loss = module.preference_step(batch)["loss"]
    torch.testing.assert_close(first_loss, torch.full_like(first_loss, math.log(2)), rtol=0, atol=1e-5)
    # The 4-bit base moves each sequence's log-prob a little; the reference still follows the SFT model closely.
    per_token = (reference[0] - sft[0]).abs() / (batch["labels"][: len(sft[0])] != -100).sum(-1)
    assert per_token.max() < 0.1, per_token


def test_qlora_refuses_to_merge_a_start_adapter_into_4bit_weights(sft_adapter):
    with pytest.raises(ValueError, match="would merge the start adapter into 4-bit weights"):
        QLoRA(init_adapter=sft_adapter, init_mode="merge")


def test_start_adapter_errors_name_the_problem(tiny_model, sft_adapter, tmp_path):
    with pytest.raises(ValueError, match="unknown init_mode 'stack'; valid: continue, merge"):
        LoRA(init_adapter=sft_adapter, init_mode="stack")
    with pytest.raises(FileNotFoundError, match="is not a peft adapter folder"):
        ready(SFTModule(tiny_model), [LoRA(init_adapter=str(tmp_path / "nothing"))], tmp_path)
    with pytest.raises(ValueError, match="does not train the score head"):
        ready(RewardModule(tiny_model), [LoRA(init_adapter=sft_adapter)], tmp_path)


def test_reward_model_and_ppo_start_from_an_sft_adapter(tiny_model, sft_adapter, task_files, tmp_path):
    reward = ready(RewardModule(tiny_model), [LoRA(init_adapter=sft_adapter, init_mode="merge")], tmp_path / "rm")
    assert any(p.requires_grad for n, p in reward.model.named_parameters() if "score" in n)
    ppo = ready(
        PPOModule(tiny_model, reward="lightning_align.demos:task_reward"), [LoRA(init_adapter=sft_adapter)], tmp_path
    )
    assert ppo.reference.kind == "frozen start adapter"
    _, batch = preference_batch(tiny_model, task_files, n=4)
    sft = sft_model_logps(tiny_model, sft_adapter, batch)
    with torch.no_grad(), ppo.reference(ppo.model) as reference:
        torch.testing.assert_close(chosen_rejected_logps(reference, batch)[0], sft[0], rtol=1e-5, atol=1e-4)


class Recorder:
    """The losses of a run, and its trained weights as training starts (after a checkpoint is restored) and after
    optimiser step `at_step`."""

    def __init__(self, at_step: int):
        import lightning as L

        def trained(module):
            return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

        class Record(L.Callback):
            def on_train_start(inner, trainer, module):
                self.at_start = trained(module)

            def on_train_batch_end(inner, trainer, module, outputs, batch, batch_idx):
                self.losses.append(outputs["loss"].item())
                if trainer.global_step == at_step:
                    self.at_step = trained(module)

        self.losses: list[float] = []
        self.at_start = self.at_step = None
        self.callback = Record()


def test_resuming_an_adapter_run_restores_the_trained_adapter(tiny_model, sft_adapter, task_files, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_align import SFTDataModule

    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=8, max_length=64)
    dm.setup("fit")
    batches = [dm.collate(dm.train_set[i * 8 : (i + 1) * 8]) for i in range(4)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # a plain loader, same order every epoch
    learning_rate = 1e-3

    def run(max_steps, ckpt_path=None):
        L.seed_everything(0)
        record = Recorder(at_step=4)
        checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
        fit = trainer(
            tmp_path,
            max_steps=max_steps,
            enable_checkpointing=True,
            callbacks=[LoRA(init_adapter=sft_adapter), checkpoints, record.callback],
        )
        fit.fit(SFTModule(tiny_model, learning_rate=learning_rate), train_dataloaders=loader, ckpt_path=ckpt_path)
        return record

    whole = run(8)
    resumed = run(8, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    assert len(whole.losses) == 8 and len(resumed.losses) == 4
    # A re-created adapter would start again from the start adapter. AdamW moves every weight with a gradient by
    # about the learning rate each step, whatever the machine's rounding, so 4 steps set them clearly apart.
    moved = max((whole.at_step[n] - whole.at_start[n]).abs().max().item() for n in whole.at_start)
    assert moved > learning_rate / 2
    for name, value in resumed.at_start.items():
        torch.testing.assert_close(value, whole.at_step[name], rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses[4:]), rtol=1e-5, atol=1e-6)
