"""PPOModule: KL control, masks, the reference, generation, reward errors, and that it learns a reward."""

import pytest
import torch

from lightning_align import LoRA, PPOModule, PromptDataModule
from lightning_align.modules.ppo import AdaptiveKLController, response_mask
from lightning_align.scoring.model import body_of
from lightning_align.scoring.plan import SAFE_PLAN
from lightning_align.scoring.responses import response_forward
from tests.conftest import TEST_SEED, ready, report_gain, task_prompts, trainer


def starts_with_one(prompts, completions):
    return [1.0 if c.startswith("1") else 0.0 for c in completions]


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    up, down, fixed = (
        AdaptiveKLController(0.1, 1.0, 100),
        AdaptiveKLController(0.1, 1.0, 100),
        AdaptiveKLController(0.1),
    )
    assert up.update(3.0, 10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error clipped at +0.2
    assert down.update(0.9, 10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert fixed.update(5.0, 10) == 0.1


def test_response_mask_covers_tokens_through_the_first_eos():
    responses = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    mask, ended = response_mask(responses, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]


def test_with_policy_equal_to_reference_kl_is_zero_everywhere_and_ratios_are_one(sft_model, task_files, tmp_path):
    module = ready(PPOModule(sft_model, reward=starts_with_one, temperature=0.7), [LoRA(r=4)], tmp_path)
    dm = task_prompts(sft_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    rollout = module.rollout(batch)  # a fresh LoRA adapter leaves the policy equal to the reference
    with module.reference(module.model) as ref:
        ref_logprobs, _ = module.response_logps(ref, rollout)
    assert torch.equal(rollout["logprobs"] * rollout["mask"], ref_logprobs * rollout["mask"])
    assert rollout["kl"] == 0
    logprobs, _ = module.response_logps(module.model, rollout)
    ratio = torch.exp(logprobs - rollout["logprobs"])[rollout["mask"].bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio))


def test_lora_reference_logprobs_are_the_base_models(sft_model, task_files, tmp_path):
    from transformers import AutoModelForCausalLM

    module = ready(PPOModule(sft_model, reward=starts_with_one), [LoRA(r=4)], tmp_path)
    for p in module.model.parameters():  # move the adapter away from zero so policy and reference differ
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    dm = task_prompts(sft_model, task_files)
    rollout = module.rollout(dm.collate(dm.train_set[:8]))
    base = AutoModelForCausalLM.from_pretrained(sft_model).eval()
    with torch.no_grad():  # the base by its own padded forward; the reference by the module's scoring plan
        base_logprobs, _ = response_forward(
            base, *(rollout[k] for k in ("sequences", "attention_mask", "prompt_length", "mask")), SAFE_PLAN, 1.0
        )
        with module.reference(module.model) as ref:
            ref_logprobs, _ = module.response_logps(ref, rollout)
    mask = rollout["mask"].bool()
    torch.testing.assert_close(ref_logprobs[mask], base_logprobs[mask])
    assert not torch.allclose(rollout["logprobs"][mask], base_logprobs[mask])


def test_batched_left_padded_generation_honours_eos_and_max_new_tokens(sft_model, task_files, tmp_path):
    module = ready(PPOModule(sft_model, reward=starts_with_one, max_new_tokens=6), [], tmp_path)
    dm = task_prompts(sft_model, task_files)
    examples = sorted(dm.train_set[:16], key=lambda e: len(e["input_ids"]))
    examples = [examples[0], examples[-1]]
    assert len(examples[0]["input_ids"]) < len(examples[1]["input_ids"])  # so the batch is really left-padded
    batch = dm.collate(examples)
    together = module.generate(batch, greedy=True)[:, batch["input_ids"].shape[1] :]
    assert together.shape[1] <= 6
    mask, _ = response_mask(together, module.tokenizer.eos_token_id)
    assert (together[mask == 0] == module.tokenizer.pad_token_id).all()  # nothing generated after EOS
    for i, example in enumerate(examples):
        alone = module.generate(dm.collate([example]), greedy=True)[0, len(example["input_ids"]) :]
        assert together[i, : len(alone)].tolist() == alone.tolist()


@pytest.mark.parametrize(
    "reward, message",
    [
        (lambda p, c: 1 / 0, "raised ZeroDivisionError: division by zero"),
        (lambda p, c: [float("nan")] * len(c), "returned a non-finite score for completion 0"),
        (lambda p, c: [1.0], "returned 1 scores for 8 completions"),
        (lambda p, c: ["high"] * len(c), "must return a list of numbers"),
    ],
)
def test_bad_reward_functions_fail_with_a_clear_message(sft_model, task_files, tmp_path, reward, message):
    module = ready(PPOModule(sft_model, reward=reward), [], tmp_path)
    dm = task_prompts(sft_model, task_files)
    with pytest.raises((ValueError, RuntimeError), match=message):
        module.rollout(dm.collate(dm.train_set[:8]))


def test_reward_given_as_import_path_or_unknown_name(sft_model, tmp_path):
    from lightning_align.modules.rewards import resolve_reward

    function, name = resolve_reward("lightning_align.demos:task_reward")
    assert function(["add: 1+2\n"], ["3"]) == [1.0] and name == "lightning_align.demos:task_reward"
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward("lightning_align.demos:no_such_reward")
    with pytest.raises(ValueError, match="neither a reward model folder nor 'package.module:function'"):
        resolve_reward(str(tmp_path / "missing"))


METRICS = (
    "reward/mean",
    "reward/std",
    "kl",
    "kl/k1",
    "kl_coef",
    "entropy",
    "policy/clipfrac",
    "policy/approx_kl",
    "loss/policy",
    "loss/value",
    "response_length",
    "completions/truncated",
    "time/generate",
    "time/reward",
    "time/score",
    "time/learn",
)


def train_on_the_task_reward(
    sft_model, task_files, tmp_path, callbacks=(), max_steps=200, kl_coef=0.1, val_batches=None, **options
):
    """Held-out mean task reward of greedy answers before and after PPO, and the last logged step metrics."""
    import lightning as L

    from lightning_align.demos import task_reward

    L.seed_everything(TEST_SEED)
    dm = PromptDataModule(
        sft_model, task_files["prompts_train"], task_files["prompts_val"], batch_size=32, apply_chat_template=False
    )
    module = PPOModule(sft_model, reward=task_reward, max_new_tokens=12, kl_coef=kl_coef, **options)
    fit = trainer(tmp_path, max_steps=max_steps, limit_val_batches=val_batches, callbacks=list(callbacks))
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/reward"].item()
    fit.fit(module, datamodule=dm)
    logged = module.logged_rollout
    fit.validate(module, datamodule=dm)
    return module, before, fit.callback_metrics["val/reward"].item(), logged


@pytest.mark.slow
@pytest.mark.learning
def test_ppo_raises_the_heldout_task_reward_with_bounded_kl(sft_model, task_files, tmp_path):
    # 1600 steps at learning rate 2e-4 (kl_coef 0.05), validated on all 200 held-out prompts: at 5e-4 for 800 steps
    # the full-weight run plateaued next to its 2x bar (0.354-0.408 from 0.185 over seeds at 2 threads); the
    # lower rate keeps the KL lower and the reward higher on every seed, thread count and CPU kernel measured
    # (benchmarks/NOTES.md, "Learning tests across machines").
    module, before, after, logged = train_on_the_task_reward(
        sft_model, task_files, tmp_path, max_steps=1600, learning_rate=2e-4, kl_coef=0.05
    )
    report_gain(before, after, f"KL {logged['kl']:.2f}")
    assert set(logged) == set(METRICS)
    # The SFT start differs by machine (0.185 to 0.251 measured): the gain bar is absolute, the ratio bar 1.5x (one
    # machine's 0.251 -> 0.466 is +0.215 but 1.86x).
    assert after > before + 0.12 and after > 1.5 * before
    assert 0 <= logged["kl"] < 5  # summed over the response, in nats


@pytest.mark.slow
@pytest.mark.learning
def test_ppo_with_lora_raises_the_heldout_task_reward_too(sft_model, task_files, tmp_path):
    module, before, after, logged = train_on_the_task_reward(
        sft_model, task_files, tmp_path, [LoRA(r=8)], max_steps=400, learning_rate=2e-3
    )
    report_gain(before, after, f"KL {logged['kl']:.2f}")
    assert module.reference.kind == "adapter-disabled base"
    assert after > before + 0.12 and 0 <= logged["kl"] < 5


@pytest.mark.learning
def test_ppo_learns_a_simple_reward_fast(sft_model, task_files, tmp_path):
    torch.manual_seed(TEST_SEED)
    dm = PromptDataModule(
        sft_model, task_files["prompts_train"], task_files["prompts_val"], batch_size=32, apply_chat_template=False
    )
    module = PPOModule(sft_model, reward=starts_with_one, max_new_tokens=8, learning_rate=1e-3, kl_coef=0.0)
    fit = trainer(tmp_path, max_steps=100, limit_val_batches=4)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/reward"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = fit.callback_metrics["val/reward"].item()
    report_gain(before, after)
    assert after > before + 0.3


def test_sft_reward_model_ppo_chain_scores_with_the_trained_reward_model(sft_model, task_files, tmp_path):
    from lightning_align import PreferenceDataModule, RewardModule
    from lightning_align.modules.rewards import RewardModelScorer

    pairs = PreferenceDataModule(sft_model, task_files["preference_train"], batch_size=16, max_length=64)
    reward_model = RewardModule(sft_model, learning_rate=1e-3)
    trainer(tmp_path / "rm", max_steps=20).fit(reward_model, datamodule=pairs)
    folder = str(reward_model.save_pretrained(tmp_path / "rm" / "export"))

    dm = PromptDataModule(
        sft_model, task_files["prompts_train"], task_files["prompts_val"], batch_size=8, apply_chat_template=False
    )
    module = PPOModule(sft_model, reward=folder, critic=folder, max_new_tokens=6, learning_rate=1e-4, minibatch_size=8)
    fit = trainer(tmp_path / "ppo", max_steps=4, limit_val_batches=1)
    fit.fit(module, datamodule=dm)
    assert isinstance(module.rewards.functions[0], RewardModelScorer)
    assert module.value_head is None and module.critic is not None
    start = reward_model.model.state_dict()
    moved = [name for name, value in module.critic.state_dict().items() if not torch.equal(value, start[name])]
    assert "score.weight" in moved and len(moved) > 10  # the critic trains, head and body
    assert torch.isfinite(fit.callback_metrics["reward"])
    dm.setup("fit")
    batch = dm.collate(dm.val_set[:4])
    completions, _, _ = module.completions(module.generate(batch, greedy=True), batch["input_ids"].shape[1])
    expected = reward_model.score(batch["prompts"], completions)
    torch.testing.assert_close(module.scores(batch, completions)[1], expected)


def test_separate_critic_values_are_the_reward_models_score_at_every_position(sft_model, task_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from lightning_align import RewardModule

    reward_model = RewardModule(sft_model)
    reward_model.configure_model()
    folder = str(reward_model.save_pretrained(tmp_path / "rm"))
    module = ready(PPOModule(sft_model, reward=starts_with_one, critic=folder), [], tmp_path)
    dm = task_prompts(sft_model, task_files)
    rollout = module.rollout(dm.collate(dm.train_set[:4]))
    critic = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    sequences, attention_mask, start = rollout["sequences"], rollout["attention_mask"], rollout["prompt_length"]
    with torch.no_grad():
        for b in range(len(sequences)):  # one row at a time, without padding
            keep = attention_mask[b].bool()
            hidden = critic.model(input_ids=sequences[b, keep][None]).last_hidden_state[0]
            first = int((~keep[:start]).sum())  # left padding before the prompt
            n = int(rollout["mask"][b].sum())
            expected = critic.score(hidden[start - first - 1 : start - first - 1 + n]).squeeze(-1)
            torch.testing.assert_close(rollout["values"][b, :n], expected, rtol=1e-4, atol=1e-5)


def test_separate_critic_learns_after_the_policys_backward_and_gradients_go_after_each_step(
    sft_model, task_files, tmp_path
):
    """Only one network's activations at a time (the critic's forward comes after the policy's backward), and no
    gradients held into the next step's forward."""
    from lightning_align import RewardModule

    reward_model = RewardModule(sft_model)
    reward_model.configure_model()
    folder = str(reward_model.save_pretrained(tmp_path / "rm"))
    module = ready(
        PPOModule(sft_model, reward=starts_with_one, critic=folder, minibatch_size=4, ppo_epochs=1), [], tmp_path
    )
    fit = trainer(tmp_path / "fit", max_steps=2, limit_val_batches=0)
    policy_grads_at_critic_forward, grads_at_policy_forward = [], []
    module.critic.base_model.register_forward_pre_hook(
        lambda *_: policy_grads_at_critic_forward.append(
            torch.is_grad_enabled() and all(p.grad is not None for p in module.model.parameters() if p.requires_grad)
        )
    )
    body_of(module.model).register_forward_pre_hook(
        lambda *_: grads_at_policy_forward.append(any(p.grad is not None for p in module.parameters()))
    )
    fit.fit(module, datamodule=task_prompts(sft_model, task_files, batch_size=8))
    assert fit.global_step == 2
    learning = [seen for seen in policy_grads_at_critic_forward if seen]
    assert len(learning) == 2  # one learning forward of the critic per step, each after the policy's backward
    assert not any(grads_at_policy_forward)
    assert all(p.grad is None for p in module.parameters())
