"""KTOModule against TRL 1.16's KTOTrainer: its own `_compute_loss` (its forward passes, the KL point from its
mismatched rows, its loss) on the batch its collator made, and ours on the same rows."""

import pytest
import torch

from lightning_align.modules import KTOModule
from tests.parity.conftest import assert_same_gradients, gradients, trl_args

ROWS = [
    {"prompt": "2+2=", "completion": "4", "label": True},
    {"prompt": "Name a colour:", "completion": " a dog", "label": False},
    {"prompt": "abc", "completion": "def ghi", "label": True},
    {"prompt": "Say hi.", "completion": " no", "label": False},
]
CASES = {
    "kto": ({}, {}),
    "kto weighted": (
        {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.7},
        {"beta": 0.3, "desirable_weight": 1.3, "undesirable_weight": 0.7},
    ),
    "apo_zero_unpaired": ({"loss_type": "apo_zero_unpaired"}, {"loss_type": "apo_zero_unpaired"}),
}


def padded_to(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


@pytest.mark.parametrize("case", CASES)
def test_kto_equals_trl(case, tiny_model, policy_folder, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    ours, theirs = CASES[case]
    args = trl_args(KTOConfig, tmp_path, per_device_train_batch_size=4, **theirs)
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_folder),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.model.train()
    batch = {
        key: value.cpu() if hasattr(value, "cpu") else value
        for key, value in next(iter(trainer.get_train_dataloader())).items()
    }
    trl = trainer._compute_loss(trainer.model, batch, False)
    trl.backward()
    trl_grads = gradients(trainer.model)

    # Ours: the examples, then their mismatched rows (TRL's KL rows, when it has them), in one padded batch.
    kl_ids = batch.get("KL_input_ids", batch["input_ids"])
    kl_mask = batch.get("KL_attention_mask", batch["attention_mask"])
    kl_completion = batch.get("KL_completion_mask", batch["completion_mask"])
    width = max(batch["input_ids"].shape[1], kl_ids.shape[1])
    ids = torch.cat([padded_to(batch["input_ids"], width, 0), padded_to(kl_ids, width, 0)])
    completion = torch.cat([padded_to(batch["completion_mask"], width, 0), padded_to(kl_completion, width, 0)])
    ours_batch = {
        "input_ids": ids,
        "attention_mask": torch.cat([padded_to(batch["attention_mask"], width, 0), padded_to(kl_mask, width, 0)]),
        "labels": ids.masked_fill(completion == 0, -100),
        "desirable": torch.as_tensor(batch["label"], dtype=torch.bool),
    }
    module = KTOModule(policy_folder, **ours)
    module.configure_model()
    module.reference = None
    module.make_reference()
    module.reference.network.load_state_dict(AutoModelForCausalLM.from_pretrained(tiny_model).state_dict())
    module.reference.to(module.model)
    module.model.train()
    step = module.kto_step(ours_batch)
    loss = step["losses"].mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), trl.detach(), rtol=1e-5, atol=1e-6)
    assert_same_gradients(gradients(module.model), trl_grads)
    assert float(step["kl"]) == pytest.approx(trainer._metrics["train"]["kl"][-1], rel=1e-5, abs=1e-6)
