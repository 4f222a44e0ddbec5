"""GRPOModule's and RLOOModule's policy losses against TRL 1.16's GRPOTrainer and RLOOTrainer: their own
`_compute_loss` (their forward pass and loss, in float64) on constructed rollouts, and ours on the same token ids,
policy, advantages, pi_old and reference log-probs."""

import pytest
import torch

from lightning_align.demos import task_reward
from lightning_align.modules import GRPOModule, RLOOModule
from tests.parity.conftest import assert_same_gradients, gradients, trl_args

WIDTH = 6  # completion tokens (max_new_tokens / max_completion_length)

# (GRPOModule settings, GRPOConfig settings) that must give equal losses and gradients.
EQUAL = {
    "grpo": ({}, {"loss_type": "grpo"}),
    "grpo beta": ({"beta": 0.04, "use_bias_correction_kl": True}, {"loss_type": "grpo", "beta": 0.04}),
    "grpo beta, plain k3": (
        {"beta": 0.04},
        {"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False},
    ),
    "dr_grpo": ({"loss_aggregation": "dr_grpo"}, {"loss_type": "dr_grpo"}),
    "dapo clip-higher beta": (
        {"loss_aggregation": "dapo", "epsilon_high": 0.28, "beta": 0.04, "use_bias_correction_kl": True},
        {"loss_type": "dapo", "epsilon_high": 0.28, "beta": 0.04},
    ),
    "bnpo": ({"loss_aggregation": "bnpo"}, {"loss_type": "bnpo"}),
    "cispo": (
        {"policy_loss": "cispo", "loss_aggregation": "dapo", "epsilon_high": 1.02},
        {"loss_type": "cispo", "epsilon_high": 1.02},
    ),
    "sapo": (
        {"policy_loss": "sapo", "sapo_temperature_pos": 1.2, "sapo_temperature_neg": 2.0},
        {"loss_type": "sapo", "sapo_temperature_pos": 1.2, "sapo_temperature_neg": 2.0},
    ),
    "gspo": (
        {"importance_sampling_level": "sequence", "beta": 0.04, "use_bias_correction_kl": True},
        {"loss_type": "grpo", "importance_sampling_level": "sequence", "beta": 0.04},
    ),
}


@pytest.fixture(scope="module")
def rollout(tiny_model, policy_folder):
    """4 prompts x 2 samples: left-padded prompts, completions of different lengths, advantages, and a pi_old
    and a reference that differ from the policy (so the ratio clips and the KL is not 0)."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(1)
    prompt_lengths, completion_lengths = [5, 3, 4, 5, 2, 5, 3, 4], [6, 2, 4, 6, 1, 5, 3, 6]
    prompt_ids = torch.zeros(8, 5, dtype=torch.long)
    prompt_mask = torch.zeros(8, 5, dtype=torch.long)
    completion_ids = torch.zeros(8, WIDTH, dtype=torch.long)
    completion_mask = torch.zeros(8, WIDTH, dtype=torch.long)
    for row, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        prompt_ids[row, 5 - p :] = torch.randint(7, 90, (p,), generator=generator)
        prompt_mask[row, 5 - p :] = 1
        completion_ids[row, :c] = torch.randint(7, 90, (c,), generator=generator)
        completion_mask[row, :c] = 1
    sequences = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)

    def logps(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64)
        with torch.no_grad():
            logits = model(input_ids=sequences, attention_mask=attention_mask).logits[:, 4:-1]
        return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1) * completion_mask

    old = logps(policy_folder) + 0.3 * torch.randn(8, WIDTH, generator=generator, dtype=torch.float64) * completion_mask
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.randn(8, generator=generator, dtype=torch.float64),
        "old_per_token_logps": old,
        "ref_per_token_logps": logps(tiny_model),
        "num_items_in_batch": completion_mask.sum(),
    }


def trl_loss(trainer_class, config_class, policy_folder, tiny_model, tmp_path, settings, inputs):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = trl_args(
        config_class,
        tmp_path,
        per_device_train_batch_size=8,
        max_completion_length=WIDTH,
        **settings,
    )
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(policy_folder, dtype=torch.float64),
        reward_funcs=lambda completions, **kwargs: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "a"}] * 8),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach(), gradients(trainer.model)


def our_loss(module, inputs, old_logprobs, advantages):
    module.configure_model()
    if module.reference is not None:
        module.reference.to(module.model)
    module.model.train()
    mask = inputs["completion_mask"].float()
    rollout = {
        "sequences": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        "prompt_length": inputs["prompt_ids"].shape[1],
        "mask": mask,
        "loss_mask": mask,
        "advantages": advantages,
        "logprobs": old_logprobs,
        "ref_logprobs": inputs["ref_per_token_logps"],
    }
    loss, _ = module.minibatch_loss(rollout, slice(None), inputs["num_items_in_batch"])
    loss.backward()
    return loss.detach(), gradients(module.model)


@pytest.mark.parametrize("case", EQUAL)
def test_grpo_loss_types_equal_trl(case, rollout, tiny_model, policy_folder, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    ours, theirs = EQUAL[case]
    module = GRPOModule(
        policy_folder, rewards=task_reward, num_generations=2, max_new_tokens=WIDTH, torch_dtype="float64", **ours
    )
    loss, grads = our_loss(module, rollout, rollout["old_per_token_logps"], rollout["advantages"])
    trl, trl_grads = trl_loss(GRPOTrainer, GRPOConfig, policy_folder, tiny_model, tmp_path, theirs, rollout)
    torch.testing.assert_close(loss, trl, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, trl_grads)


def test_rloo_module_equals_trl_rloo_loss(rollout, tiny_model, policy_folder, tmp_path):
    """RLOOModule's sequence-level clipped loss; TRL's RLOO takes pi_old as each sample's summed log-prob."""
    from trl import RLOOConfig, RLOOTrainer

    inputs = {key: value for key, value in rollout.items() if "per_token" not in key}
    inputs["old_logps"] = rollout["old_per_token_logps"].sum(-1)
    module = RLOOModule(
        policy_folder, rewards=task_reward, max_new_tokens=WIDTH, beta=0.0, epsilon_high=0.28, torch_dtype="float64"
    )
    loss, grads = our_loss(module, rollout, rollout["old_per_token_logps"], rollout["advantages"])
    trl, trl_grads = trl_loss(
        RLOOTrainer, RLOOConfig, policy_folder, tiny_model, tmp_path, {"beta": 0.0, "epsilon_high": 0.28}, inputs
    )
    torch.testing.assert_close(loss, trl, rtol=1e-5, atol=1e-6)
    assert_same_gradients(grads, trl_grads)
    token_level = GRPOModule(
        policy_folder, rewards=task_reward, advantage="rloo", max_new_tokens=WIDTH, torch_dtype="float64"
    )
    differs = our_loss(token_level, rollout, rollout["old_per_token_logps"], rollout["advantages"])[0]
    assert abs(float(differs - trl)) > 1e-3  # GRPOModule(advantage="rloo") is the token-level form, documented


def test_default_kl_gradient_differs_from_trl_and_the_switch_removes_it(rollout, tiny_model, policy_folder, tmp_path):
    """Documented: TRL 1.16 weighs k3 by the ratio by default (use_bias_correction_kl=True); we default to
    DeepSeekMath's plain k3. The losses agree (the ratio's value is ~1 here), the gradients do not."""
    from trl import GRPOConfig, GRPOTrainer

    settings = {"loss_type": "grpo", "beta": 0.04}
    trl_grads = trl_loss(GRPOTrainer, GRPOConfig, policy_folder, tiny_model, tmp_path, settings, rollout)[1]
    grads = {}
    for switch in (False, True):
        module = GRPOModule(
            policy_folder,
            rewards=task_reward,
            num_generations=2,
            max_new_tokens=WIDTH,
            torch_dtype="float64",
            beta=0.04,
            use_bias_correction_kl=switch,
        )
        grads[switch] = our_loss(module, rollout, rollout["old_per_token_logps"], rollout["advantages"])[1]
    with pytest.raises(AssertionError):
        assert_same_gradients(grads[False], trl_grads)
    assert_same_gradients(grads[True], trl_grads)
