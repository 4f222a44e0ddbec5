"""ORPOModule against TRL 1.16's experimental ORPOTrainer: its own `get_batch_loss_metrics` (its forward pass,
NLL and odds-ratio loss, metrics) on the batch its collator made, and ours on the same rows."""

import pytest
import torch

from lightning_align.modules import ORPOModule
from tests.parity.conftest import assert_same_gradients, gradients, trl_args

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "Name a colour:", "chosen": " red", "rejected": " a dog"},
    {"prompt": "abc", "chosen": "def ghi", "rejected": "xyz"},
]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "log_odds_ratio", "log_odds_chosen")


def padded_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


@pytest.fixture(scope="module")
def trl_orpo(tiny_model, policy_folder, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = trl_args(ORPOConfig, tmp_path_factory.mktemp("trl-orpo"), per_device_train_batch_size=3, beta=0.2)
    trainer = ORPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_folder),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    return batch, loss.detach(), gradients(trainer.model), {name: float(metrics[name]) for name in METRICS}


def our_step(policy_folder, batch, **settings):
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key, value):
        return torch.cat([padded_to(batch[f"{side}_{key}"], width, value) for side in ("chosen", "rejected")])

    ours = {
        "input_ids": both("input_ids", 0),
        "attention_mask": both("attention_mask", 0),
        "labels": both("labels", -100),
    }
    module = ORPOModule(policy_folder, orpo_lambda=0.2, **settings)
    module.configure_model()
    module.model.train()
    metrics = module.preference_step(ours)
    loss = metrics.pop("loss").mean()
    loss.backward()
    return loss.detach(), gradients(module.model), {name: float(metrics[name].mean()) for name in METRICS}


def test_orpo_with_the_prompt_in_its_nll_equals_trl(trl_orpo, policy_folder):
    batch, trl, trl_grads, trl_metrics = trl_orpo
    loss, grads, metrics = our_step(policy_folder, batch, nll_on_prompt=True)
    torch.testing.assert_close(loss, trl, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, trl_grads)
    for name in METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name


def test_orpo_default_nll_counts_the_completion_only(trl_orpo, policy_folder):
    """Documented: ORPO's paper (and our default) scores the chosen completions; TRL adds the prompt's tokens."""
    batch, trl = trl_orpo[:2]
    loss, _, metrics = our_step(policy_folder, batch)
    assert abs(float(loss - trl)) > 1e-3
    assert metrics["log_odds_ratio"] == pytest.approx(trl_orpo[3]["log_odds_ratio"], rel=1e-5)  # the same odds term
