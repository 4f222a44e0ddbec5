"""The architecture grid: on a tiny random model of every family in `ARCHITECTURES`, the scoring path the library
picks for SFT (packed and padded), DPO and the reward model equals the model's own padded forward, gradients
included; every method trains a step with and without LoRA; DPO's first loss is log 2 with dropout in the config.
A new family is one line in `lightning_align.scoring.families`."""

import math

import pytest
import torch

from lightning_align import (
    DPOModule,
    LoRA,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from lightning_align.data.collate import packed_collate
from lightning_align.losses import sft_loss
from lightning_align.scoring.families import ARCHITECTURES, WINDOW
from lightning_align.scoring.packing import unpack
from lightning_align.scoring.plan import SAFE_PLAN, fastest_plan
from lightning_align.scoring.responses import response_forward
from lightning_align.scoring.rows import response_logps
from lightning_align.scoring.scores import batch_rewards
from tests.conftest import padded, random_examples, ready, trainer

NAMES = list(ARCHITECTURES)


def gradients(module) -> dict:
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    return grads


def assert_equal_with_gradients(fast, fast_grads, own, own_grads):
    torch.testing.assert_close(fast, own, rtol=1e-4, atol=1e-4)
    assert fast_grads.keys() == own_grads.keys() and len(own_grads) > 4
    for name, grad in own_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)


def test_every_tested_row_is_longer_than_the_window():
    assert max(len(e["input_ids"]) for e in random_examples(100)) > 3 * WINDOW


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_by_the_chosen_path_equals_the_models_own_padded_forward(name, packing, model_folders, tmp_path):
    module = ready(SFTModule(model_folders(name)), tmp_path=tmp_path)
    module.model.eval()  # dropout off, so both passes see the same network
    examples = random_examples(module.model.config.vocab_size)
    batch = packed_collate(examples) if packing else padded(examples)
    plan = module.scoring_plan(batch)
    assert plan == fastest_plan(module.model, module.device) and plan.proven  # the fast path passed its check
    fast = module.scored_loss(batch)
    fast.backward()
    fast_grads = gradients(module)
    rows = unpack(batch) if packing else batch
    own = sft_loss(module.model(**{k: rows[k] for k in ("input_ids", "attention_mask")}).logits, rows["labels"])
    own.backward()
    assert_equal_with_gradients(fast, fast_grads, own, gradients(module))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_dpo_logps_by_the_chosen_path_equal_the_models_own_padded_forward(name, checkpointing, model_folders, tmp_path):
    module = ready(DPOModule(model_folders(name), gradient_checkpointing=checkpointing), tmp_path=tmp_path)
    batch = padded(random_examples(module.model.config.vocab_size))
    plan = module.scoring_plan(module.model, batch)
    assert plan == fastest_plan(module.model, module.device) and plan.proven
    weights = torch.linspace(0.5, 1.5, len(batch["input_ids"]))  # any loss that is not a plain sum
    results = []
    for scoring in (plan, SAFE_PLAN):
        logps = response_logps(module.model, batch, plan=scoring)
        (torch.sigmoid(logps / 50) * weights).sum().backward()
        results += [logps.detach(), gradients(module)]
    assert_equal_with_gradients(*results)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("checkpointing", [False, True, "selective"])
def test_rewards_by_the_chosen_path_equal_the_models_own_padded_forward(name, checkpointing, model_folders, tmp_path):
    torch.manual_seed(0)
    module = ready(RewardModule(model_folders(name), gradient_checkpointing=checkpointing), tmp_path=tmp_path)
    batch = padded(random_examples(module.model.config.vocab_size))
    plan = module.scoring_plan(batch)
    assert plan == fastest_plan(module.model, module.device, packing=plan.packed) and plan.proven
    results = []
    for scoring in (plan, SAFE_PLAN):
        rewards = batch_rewards(module.model, batch, scoring)
        (rewards * torch.arange(1.0, len(rewards) + 1)).sum().backward()
        results += [rewards.detach(), gradients(module)]
    assert_equal_with_gradients(*results)


def rollout_rows(vocab_size: int, prompt_lengths=(30, 11, 20, 9), response_lengths=(12, 3, 16, 7)) -> tuple:
    """Rollout-shaped rows: left-padded prompts, then responses right-padded after their own length (16 wide)."""
    generator = torch.Generator().manual_seed(1)
    prompt_length, width = max(prompt_lengths), max(prompt_lengths) + max(response_lengths)
    sequences = torch.zeros(len(prompt_lengths), width, dtype=torch.long)
    mask = torch.zeros(len(prompt_lengths), max(response_lengths))
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        sequences[row, prompt_length - p : prompt_length + r] = torch.randint(
            7, vocab_size, (p + r,), generator=generator
        )
        mask[row, :r] = 1
    attention_mask = torch.cat([(sequences[:, :prompt_length] != 0).long(), mask.long()], dim=1)
    return sequences, attention_mask, prompt_length, mask


@pytest.mark.parametrize("name", NAMES)
def test_online_rl_logps_and_values_by_the_chosen_path_equal_the_models_own_padded_forward(
    name, model_folders, tmp_path
):
    """PPO / GRPO's response log-probs and the hidden states under a value head (the policy's scoring plan, packed
    where it packs), and a separate value model's values, equal the padded forward's, gradients included."""
    from transformers import AutoModelForSequenceClassification

    from lightning_align.scoring.scores import score_head_values

    module = ready(PPOModule(model_folders(name), reward=first_step_reward), tmp_path=tmp_path)
    model = module.model.eval()
    sequences, attention_mask, prompt_length, mask = rows = rollout_rows(model.config.vocab_size)
    plan = module.scoring_plan(model, *rows)
    assert plan == fastest_plan(model, module.device, packing=plan.packed) and plan.proven
    # Packed wherever the family's attention allows it and the chunked output layer applies (no logit soft-capping).
    assert plan.packed == (name != "bloom" and plan.output_layer == "chunked")
    weights = torch.linspace(0.5, 1.5, mask.shape[1])
    results = []
    for scoring in (plan, SAFE_PLAN):
        logps, hidden = response_forward(model, *rows, scoring, temperature=0.7, want_hidden=True)
        hidden = hidden * mask.unsqueeze(-1)  # past a response's end the paths may differ: nothing reads there
        (torch.sigmoid(logps / 5) * weights).sum().add(hidden.square().mean()).backward()
        results += [torch.cat([logps.detach().flatten(), hidden.detach().flatten()]), gradients(module)]
    assert_equal_with_gradients(*results)

    torch.manual_seed(0)
    critic = AutoModelForSequenceClassification.from_pretrained(model_folders(name), num_labels=1).eval()
    critic_plan = fastest_plan(critic, module.device)
    assert critic_plan.packed == (name != "bloom")
    results = []
    for scoring in (critic_plan, SAFE_PLAN):
        values = score_head_values(critic, *rows, scoring) * mask
        (values * weights).sum().backward()
        results += [values.detach(), gradients(critic)]
    assert_equal_with_gradients(*results)


@pytest.mark.parametrize("name", NAMES)
def test_first_dpo_loss_under_lora_is_log_2_with_dropout_in_the_config(name, model_folders, tmp_path):
    module = ready(DPOModule(model_folders(name)), [LoRA(r=4)], tmp_path)
    assert module.model.training
    examples = random_examples(module.model.config.vocab_size, lengths=(30, 14, 11, 9, 20, 12, 16, 25))
    losses = module.preference_step(padded(examples))["loss"]
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-5)


def test_dropout_stays_out_of_the_reference_even_when_the_policy_keeps_it(model_folders, tmp_path):
    module = ready(DPOModule(model_folders("gpt2"), disable_dropout=False), [LoRA(r=4)], tmp_path)
    assert module.model.get_base_model().config.attn_pdrop > 0
    batch = padded(random_examples(module.model.config.vocab_size))
    first, second = module.reference_logps(batch), module.reference_logps(batch)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    with torch.no_grad():  # the policy itself still drops out, as asked
        assert not torch.equal(module.sequence_logps(module.model, batch), module.sequence_logps(module.model, batch))
    assert module.model.training


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_the_decode_loop_samples_generates_tokens(name, adapter, model_folders, tmp_path):
    """Greedy: token for token equal to `model.generate` on a left-padded batch (with the KV cache, past the
    sliding window); sampling: equal to `generate` wherever the distribution is a point mass (temperature ~0)."""
    from lightning_align.modules.sampling import decode, decode_loop_proven

    module = ready(SFTModule(model_folders(name)), [LoRA(r=4)] if adapter else [], tmp_path)
    model = module.model.eval()
    if adapter:  # a trained adapter, so the loop must go through it
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.2)
    assert decode_loop_proven(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = [3, 11, 7]
    input_ids = torch.zeros(3, max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, -n:] = torch.randint(3, vocab, (n,), generator=g)
        attention_mask[row, -n:] = 1
    new = 3 * WINDOW  # beyond the sliding window of the families that have one
    with torch.no_grad():
        expected = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=0,
            eos_token_id=2,
        )
    ours = decode(
        model, input_ids, attention_mask, new, eos_token_id=2, pad_token_id=0, greedy=True, min_new_tokens=new
    )
    assert ours.tolist() == expected.tolist()
    nearly_greedy = decode(model, input_ids, attention_mask, new, 2, 0, temperature=1e-6, min_new_tokens=new)
    assert nearly_greedy.tolist() == expected.tolist()
    # The sampler's log-probs (a rollout's pi_old in float32) equal the model's own forward's on the sequences.
    sampled, logprobs = decode(
        model, input_ids, attention_mask, new, 2, 0, 0.8, min_new_tokens=new, return_logprobs=True
    )
    mask = torch.ones_like(sampled[:, input_ids.shape[1] :])
    full_mask = torch.cat([attention_mask, mask], dim=1)
    with torch.no_grad():
        own, _ = response_forward(model, sampled, full_mask, input_ids.shape[1], mask, SAFE_PLAN, 0.8)
    torch.testing.assert_close(logprobs, own, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def small_task_files(tmp_path_factory):
    from lightning_align.demos import write_task_data

    return write_task_data(tmp_path_factory.mktemp("grid-tasks"), n_train=16, n_val=4)


def first_step_reward(prompts, completions):
    return [float(len(c)) for c in completions]


def method_and_data(method: str, path: str, files: dict):
    if method == "sft":
        return SFTModule(path, learning_rate=1e-2), SFTDataModule(path, files["sft_train"], batch_size=4, max_length=48)
    if method in ("dpo", "reward"):
        module = DPOModule(path, learning_rate=1e-2) if method == "dpo" else RewardModule(path, learning_rate=1e-2)
        data = PreferenceDataModule(path, files["preference_train"], batch_size=4, max_length=48)
        return module, data
    module = PPOModule(path, reward=first_step_reward, max_new_tokens=4, minibatch_size=4, ppo_epochs=1)
    return module, PromptDataModule(path, files["prompts_train"], batch_size=4)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_every_method_trains_a_step(name, adapter, model_folders, small_task_files, tmp_path):
    for method in ("sft", "reward", "dpo", "ppo"):
        torch.manual_seed(0)
        module, data = method_and_data(method, model_folders(name), small_task_files)
        callbacks = [LoRA(r=4)] if adapter else []
        fit = trainer(tmp_path / method, max_steps=1, limit_val_batches=0, callbacks=callbacks)
        fit.strategy.connect(module)
        module.trainer = fit
        module.configure_model()
        before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        fit.fit(module, datamodule=data)
        moved = [n for n, p in module.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert fit.global_step >= 1 and moved, f"{method}: no trained weight moved"
        if adapter:
            assert all("lora_" in n or "score" in n or "value_head" in n for n in moved), method


def test_lora_on_moe_reports_adapted_kinds_and_reaches_routed_experts_when_asked(
    model_folders, small_task_files, tmp_path, caplog
):
    import logging

    path = model_folders("qwen2_moe")
    with caplog.at_level(logging.INFO):
        default = LoRA(r=4)
        ready(SFTModule(path), [default], tmp_path)
    assert default.adapted_kinds == {"attention": 8, "shared experts": 8}  # 4 projections + 3 MLP + gate, 2 layers
    assert "adapted layers: attention 8, shared experts 8" in caplog.text
    assert "routed experts are not adapted" in caplog.text and "target_parameters" in caplog.text

    experts = LoRA(r=4, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    module, data = method_and_data("sft", path, small_task_files)
    fit = trainer(tmp_path / "experts", max_steps=1, limit_val_batches=0, callbacks=[experts])
    fit.fit(module, datamodule=data)
    assert experts.adapted_kinds["routed experts"] == 2
    expert_adapters = [p for n, p in module.named_parameters() if "experts" in n and "lora_B" in n]
    assert expert_adapters and all(p.abs().sum() > 0 for p in expert_adapters)  # B starts at zero: it trained
