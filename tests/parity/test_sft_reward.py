"""SFTModule and RewardModule against TRL 1.16's SFTTrainer and RewardTrainer: their own `compute_loss` on the
batches their collators made, and ours on the same token ids and weights."""

import pytest
import torch

from lightning_align.modules import RewardModule, SFTModule
from tests.parity.conftest import assert_same_gradients, gradients, trl_args

SFT_ROWS = [
    {"prompt": "2+2=", "completion": "4"},
    {"prompt": "Name a colour:", "completion": " red, or blue"},
    {"prompt": "abc", "completion": "def ghi"},
    {"prompt": "Say hi.", "completion": " Hello there!"},
]
PAIRS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think", "margin": 0.5},
    {"prompt": "Name a colour:", "chosen": " red", "rejected": " a dog", "margin": 1.0},
    {"prompt": "abc", "chosen": "def ghi", "rejected": "xyz", "margin": 0.0},
]


def test_sft_loss_equals_trl(tiny_model, policy_folder, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = trl_args(SFTConfig, tmp_path, per_device_train_batch_size=4)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_folder),
        args=args,
        train_dataset=Dataset.from_list(SFT_ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    ours_batch = {key: batch[key].clone() for key in ("input_ids", "attention_mask", "labels")}
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()  # completion-only on both sides
    trl = trainer.compute_loss(trainer.model, dict(batch))
    trl.backward()
    module = SFTModule(policy_folder)
    module.configure_model()
    module.model.train()
    loss = module.scored_loss(ours_batch)  # the token mean of one micro-batch, as TRL's without accumulation
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(module.model), gradients(trainer.model))


@pytest.fixture(scope="module")
def reward_folder(tiny_model, policy_folder, tmp_path_factory) -> str:
    """A reward model: the moved policy with a seeded score head, saved with its pad token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(policy_folder, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model.config.pad_token_id = tokenizer.pad_token_id
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_loss_equals_trl(margin, center, reward_folder, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = PAIRS if margin else [{k: v for k, v in row.items() if k != "margin"} for row in PAIRS]
    args = trl_args(RewardConfig, tmp_path, per_device_train_batch_size=3, center_rewards_coefficient=center)
    trainer = RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(reward_folder, num_labels=1),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(reward_folder),
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert ("margin" in batch) == margin
    ours_batch = {key: value.clone() for key, value in batch.items()}
    trl = trainer.compute_loss(trainer.model, dict(batch))
    trl.backward()
    module = RewardModule(reward_folder, center_rewards_coefficient=center or 0.0)
    module.configure_model()
    module.model.train()
    loss = module.step_loss(ours_batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(module.model), gradients(trainer.model))
