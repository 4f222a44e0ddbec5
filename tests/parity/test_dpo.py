"""DPOModule against TRL 1.16's DPOTrainer: its own `_compute_loss` (its forward passes, loss and metrics) on the
batch its collator made, and ours on the same token ids, policy and reference."""

import pytest
import torch

from lightning_align.modules import DPOModule
from tests.parity.conftest import assert_same_gradients, gradients, trl_args

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "five, I think"},
    {"prompt": "Name a colour:", "chosen": " red", "rejected": " a dog"},
    {"prompt": "abc", "chosen": "def ghi", "rejected": "xyz"},
    {"prompt": "Say hi.", "chosen": " Hello there!", "rejected": " no"},
]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)

# (our DPOModule settings, TRL's DPOConfig settings) that must give equal losses, gradients and metrics.
EQUAL = {
    "sigmoid": ({}, {}),
    "hinge": ({"loss_type": "hinge"}, {"loss_type": ["hinge"]}),
    "ipo": ({"loss_type": "ipo"}, {"loss_type": ["ipo"]}),
    "robust": ({"loss_type": "robust", "label_smoothing": 0.1}, {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "exo_pair": (
        {"loss_type": "exo_pair", "label_smoothing": 1e-3},
        {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    ),
    "nca_pair": ({"loss_type": "nca_pair"}, {"loss_type": ["nca_pair"]}),
    "bco_pair": ({"loss_type": "bco_pair", "bco_running_mean": False}, {"loss_type": ["bco_pair"]}),
    "sppo_hard": ({"loss_type": "sppo_hard"}, {"loss_type": ["sppo_hard"]}),
    "aot": ({"loss_type": "aot", "label_smoothing": 0.1}, {"loss_type": ["aot"], "label_smoothing": 0.1}),
    "aot_unpaired": ({"loss_type": "aot_unpaired"}, {"loss_type": ["aot_unpaired"]}),
    "apo_zero": ({"loss_type": "apo_zero"}, {"loss_type": ["apo_zero"]}),
    "apo_down": ({"loss_type": "apo_down"}, {"loss_type": ["apo_down"]}),
    "discopop": ({"loss_type": "discopop", "discopop_tau": 0.1}, {"loss_type": ["discopop"], "discopop_tau": 0.1}),
    "sigmoid_norm": ({"loss_type": "sigmoid_norm"}, {"loss_type": ["sigmoid_norm"]}),
    "mpo": (
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0], "bco_running_mean": False},
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    ),
    "rpo": ({"rpo_alpha": 0.5}, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "forward_kl": ({"f_divergence_type": "forward_kl"}, {"f_divergence_type": "forward_kl"}),
    "js_divergence": (
        {"loss_type": "hinge", "f_divergence_type": "js_divergence"},
        {"loss_type": ["hinge"], "f_divergence_type": "js_divergence"},
    ),
    "alpha_divergence": (
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ),
    "ld_alpha": ({"ld_alpha": 0.5}, {"ld_alpha": 0.5}),
    "wpo": ({"use_weighting": True, "beta": 0.5}, {"use_weighting": True, "beta": 0.5}),
}
# Where we differ on purpose: (ours as TRL users get it, TRL's settings, ours with the switch that gives TRL's).
DIFFERS = {
    "sigmoid label_smoothing (cDPO; TRL ignores it)": (
        {"label_smoothing": 0.2},
        {"label_smoothing": 0.2},
        {"label_smoothing": 0.0},
    ),
    "bco_pair running mean (BCO's delta; TRL's is 0)": (
        {"loss_type": "bco_pair"},
        {"loss_type": ["bco_pair"]},
        {"loss_type": "bco_pair", "bco_running_mean": False},
    ),
    "sft term per response (nll_average; TRL's is the token mean)": (
        {"loss_type": ["sigmoid", "sft"], "nll_average": "responses"},
        {"loss_type": ["sigmoid", "sft"]},
        {"loss_type": ["sigmoid", "sft"], "nll_average": "tokens"},
    ),
}


@pytest.fixture(scope="module")
def trl_dpo(tiny_model, policy_folder, tmp_path_factory):
    """TRL's DPOTrainer (WPO's outputs enabled) and the batch its collator made from ROWS."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = trl_args(DPOConfig, tmp_path_factory.mktemp("trl-dpo"), per_device_train_batch_size=4, use_weighting=True)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_folder),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model),
        args=args,
        train_dataset=Dataset.from_list(ROWS),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, {key: value.cpu() for key, value in batch.items()}


def trl_step(trl_dpo, settings: dict):
    """TRL's loss, gradients and metrics for `settings` (DPOConfig fields) on its batch."""
    trainer, batch = trl_dpo
    loss_types = settings.get("loss_type", ["sigmoid"])
    trainer.loss_types = loss_types
    trainer.loss_weights = settings.get("loss_weights", [1.0] * len(loss_types))
    trainer.beta = settings.get("beta", 0.1)
    trainer.label_smoothing = settings.get("label_smoothing", 0.0)
    trainer.f_divergence_type = settings.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = settings.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = settings.get("use_weighting", False)
    trainer.ld_alpha = settings.get("ld_alpha")
    trainer.args.discopop_tau = settings.get("discopop_tau", 0.05)
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    metrics = {name: trainer._metrics["train"][name][-1] for name in METRICS}
    return loss.detach(), gradients(trainer.model), metrics


def our_step(tiny_model, policy_folder, batch: dict, settings: dict, state: dict | None = None):
    module = DPOModule(policy_folder, ref_model=tiny_model, **settings)
    for name, value in (state or {}).items():
        setattr(module, name, value)
    module.configure_model()
    module.reference.to(module.model)
    module.model.train()
    ours = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
    }
    metrics = module.preference_step(ours)
    loss = metrics.pop("loss").mean()
    loss.backward()
    return loss.detach(), gradients(module.model), {name: float(metrics[name].mean()) for name in METRICS}


@pytest.mark.parametrize("case", EQUAL)
def test_equal_to_trl(case, trl_dpo, tiny_model, policy_folder):
    ours, theirs = EQUAL[case]
    loss, grads, metrics = our_step(tiny_model, policy_folder, trl_dpo[1], ours)
    trl_loss, trl_grads, trl_metrics = trl_step(trl_dpo, theirs)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, trl_grads)
    for name in METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], rel=1e-5, abs=2e-5), name  # sums of ~30 in fp32


@pytest.mark.parametrize("case", DIFFERS)
def test_documented_difference_and_its_switch(case, trl_dpo, tiny_model, policy_folder):
    ours, theirs, switched = DIFFERS[case]
    trl_loss = trl_step(trl_dpo, theirs)[0]
    # BCO's running mean starts at 0: give it the value some training would have left.
    state = {"bco_rewards": {"sum": 0.3, "count": 2}} if case.startswith("bco_pair") else {}
    loss = our_step(tiny_model, policy_folder, trl_dpo[1], ours, state)[0]
    assert abs(float(loss - trl_loss)) > 1e-4, "the documented difference is gone: update tests/parity/table.py"
    switched_loss = our_step(tiny_model, policy_folder, trl_dpo[1], switched, state)[0]
    torch.testing.assert_close(switched_loss, trl_loss, rtol=1e-5, atol=1e-6)
