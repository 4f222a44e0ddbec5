"""Multi-turn rollouts: tokens from the environment are never trained on (the episode mask), the loss and its
gradients equal a naive loop over each turn's own forward pass, the sampler's log-probs are the policy's, and
episodes of one batch end at different turns."""

import lightning as L
import pytest
import torch

from lightning_align import GRPOModule
from lightning_align.environments import Environment, Turn
from lightning_align.modules.episodes import episode_metrics, sample_episodes
from tests.conftest import TEST_SEED, ready, task_prompts


class Scripted(Environment):
    """Answers every turn with a tool message; an episode ends after as many turns as its prompt's row number
    allows (1 to 3), so the episodes of a batch end at different turns."""

    max_turns, max_tokens = 3, 96

    def step(self, row, messages, token_ids, stats):
        stats.turns += 1
        if stats.turns >= 1 + stats.episode % 3:
            return Turn(done=True, reward=1.0 + stats.episode % 4)
        return Turn(done=False, messages=[{"role": "tool", "content": f"result {stats.turns}"}])


@pytest.fixture
def episodes(tiny_model, task_files, tmp_path):
    L.seed_everything(TEST_SEED)
    dm = task_prompts(tiny_model, task_files, batch_size=3)
    dm.setup("fit")
    module = GRPOModule(tiny_model, environment=Scripted(), num_generations=2, max_new_tokens=5)
    ready(module, [], tmp_path)
    rollout = sample_episodes(module, dm.collate(dm.train_set[:3]), module.environment, 2)
    return module, rollout


def turn_spans(mask_row):
    """(start, end) of each run of sampled tokens in a response."""
    spans, start = [], None
    for t, sampled in enumerate(mask_row.tolist() + [0]):
        if sampled and start is None:
            start = t
        elif not sampled and start is not None:
            spans.append((start, t))
            start = None
    return spans


def test_environment_tokens_are_masked_and_episodes_end_at_different_turns(episodes):
    module, rollout = episodes
    stats = rollout["episode_stats"]
    assert sorted({s.turns for s in stats}) == [1, 2, 3]
    prompt = rollout["prompt_length"]
    for i, s in enumerate(stats):
        responses = rollout["sequences"][i, prompt:]
        real = rollout["attention_mask"][i, prompt:].bool()
        mask = rollout["mask"][i]
        assert len(turn_spans(mask)) == s.turns  # one sampled run per policy turn
        environment_text = module.tokenizer.decode(responses[real & (mask == 0)])
        assert environment_text.count("<|tool|>result") == s.turns - 1  # tool results: never in the mask
        assert "<|tool|>" not in module.tokenizer.decode(responses[mask.bool()])
    metrics = episode_metrics(rollout)
    assert metrics["tokens/environment"] > 0 and metrics["episodes/turns"] == pytest.approx(2.0)


def test_sampled_logprobs_are_the_policys_given_the_whole_episode(episodes):
    module, rollout = episodes
    logprobs, _ = module.response_logps(module.model, rollout)
    mask = rollout["mask"].bool()
    torch.testing.assert_close(rollout["sampled_logprobs"][mask], logprobs[mask], rtol=1e-4, atol=1e-4)


def test_the_masked_loss_and_gradients_equal_a_naive_loop_over_turns(episodes):
    module, rollout = episodes
    rollout["advantages"] = torch.linspace(-1.0, 1.0, len(rollout["reward"]))
    rollout["loss_mask"] = rollout["mask"]
    loss, _ = module.minibatch_loss(rollout, slice(None), rollout["mask"].sum())
    loss.backward()
    ours = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.model.zero_grad(set_to_none=True)

    prompt, per_episode = rollout["prompt_length"], []
    for i in range(len(rollout["reward"])):
        row = rollout["sequences"][i]
        start = int((rollout["attention_mask"][i, :prompt] == 0).sum())  # the prompt's left padding
        terms = []
        for a, b in turn_spans(rollout["mask"][i]):  # each turn: its own forward on what came before it
            ids = row[start : prompt + b][None]
            logits = module.model(input_ids=ids).logits[0, prompt - start + a - 1 : prompt - start + b - 1]
            logps = torch.log_softmax(logits.float(), -1).gather(-1, row[prompt + a : prompt + b, None]).squeeze(-1)
            terms.append(-rollout["advantages"][i] * torch.exp(logps - logps.detach()))
        tokens = torch.cat(terms)
        per_episode.append(tokens.sum() / len(tokens))
    naive = torch.stack(per_episode).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-6)
    for name, parameter in module.model.named_parameters():
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_reinforce_pp_puts_the_episode_reward_on_its_last_sampled_token(tiny_model, task_files, tmp_path):
    from lightning_align.modules.grpo import last_sampled

    assert last_sampled(torch.tensor([[1.0, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])).tolist() == [5, 2]
    L.seed_everything(TEST_SEED)
    dm = task_prompts(tiny_model, task_files, batch_size=3)
    dm.setup("fit")
    module = GRPOModule(
        tiny_model, environment=Scripted(), advantage="reinforce++", beta=0.0, num_generations=2, max_new_tokens=5
    )
    ready(module, [], tmp_path)
    rollout = module.rollout(dm.collate(dm.train_set[:3]))
    mask = rollout["mask"].bool()
    # With beta 0 every sampled token's return is the episode's reward: one advantage per episode, growing with it.
    advantages = rollout["advantages"]
    for row in range(len(mask)):
        values = advantages[row][mask[row]]
        torch.testing.assert_close(values, values[:1].expand_as(values))
    last = advantages[torch.arange(len(mask)), last_sampled(rollout["mask"])]
    order = rollout["reward"].argsort()
    assert rollout["reward"].unique().numel() > 1 and max(s.turns for s in rollout["episode_stats"]) > 1
    assert torch.all(last[order][1:] >= last[order][:-1] - 1e-6)


@pytest.fixture
def ppo_episodes(tiny_model, task_files, tmp_path):
    from lightning_align import PPOModule

    L.seed_everything(TEST_SEED)
    dm = task_prompts(tiny_model, task_files, batch_size=6)
    dm.setup("fit")
    environment = Scripted()
    environment.cut_reward = 0.0
    module = PPOModule(tiny_model, environment=environment, max_new_tokens=5, kl_coef=0.0, gamma=1.0, lam=1.0)
    ready(module, [], tmp_path)
    return module, module.rollout(dm.collate(dm.train_set[:6]))


def test_ppo_over_episodes_returns_the_score_at_every_sampled_token_across_the_environments_turns(ppo_episodes):
    module, rollout = ppo_episodes
    # No KL, gamma = lam = 1: every policy token's return is its episode's score, the first turn's included
    # (GAE steps over the tool results between turns instead of ending the episode there).
    mask = rollout["mask"].bool()
    assert max(s.turns for s in rollout["episode_stats"]) == 3
    for row in range(len(mask)):
        returns = rollout["returns"][row][mask[row]]
        torch.testing.assert_close(returns, torch.full_like(returns, float(rollout["scores"][row])))
        assert (rollout["returns"][row][~mask[row]] == 0).all() and (rollout["advantages"][row][~mask[row]] == 0).all()


def test_ppo_over_episodes_loss_and_gradients_equal_a_naive_loop_over_turns(ppo_episodes):
    module, rollout = ppo_episodes
    losses = list(module.step_losses(rollout))
    sum(losses).backward()
    ours = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)

    prompt, logps, values, rows = rollout["prompt_length"], [], [], []
    for i in range(len(rollout["reward"])):
        row = rollout["sequences"][i]
        start = int((rollout["attention_mask"][i, :prompt] == 0).sum())
        for a, b in turn_spans(rollout["mask"][i]):  # each turn: its own forward on what came before it
            out = module.model(input_ids=row[start : prompt + b][None], output_hidden_states=True)
            span = slice(prompt - start + a - 1, prompt - start + b - 1)
            log_softmax = torch.log_softmax(out.logits[0, span].float(), -1)
            logps.append(log_softmax.gather(-1, row[prompt + a : prompt + b, None]).squeeze(-1))
            values.append(module.value_head(out.hidden_states[-1][0, span]).squeeze(-1))
            rows += [(i, t) for t in range(a, b)]
    logp, value = torch.cat(logps), torch.cat(values)
    index = tuple(torch.tensor(rows).T)
    advantages, old = rollout["advantages"][index], rollout["logprobs"][index]
    ratio = torch.exp(logp - old)
    policy = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    old_values, returns = rollout["values"][index], rollout["returns"][index]
    clipped = old_values + (value - old_values).clamp(-0.2, 0.2)
    value_loss = 0.5 * torch.maximum((value - returns) ** 2, (clipped - returns) ** 2).mean()
    naive = policy + module.vf_coef * value_loss
    naive.backward()
    torch.testing.assert_close(sum(losses).detach(), naive.detach(), rtol=1e-5, atol=1e-6)
    for name, parameter in module.named_parameters():
        if name in ours:
            torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any("value_head" in name for name in ours) and any("model." in name for name in ours)


def test_ppo_with_an_environment_needs_a_reward_for_cut_episodes(tiny_model):
    from lightning_align import PPOModule

    with pytest.raises(ValueError, match="cut_reward"):
        PPOModule(tiny_model, environment=Scripted())
    with pytest.raises(ValueError, match="rewards .* or an environment"):
        PPOModule(tiny_model)


def test_a_turn_is_kept_through_the_end_of_its_first_tool_call_or_its_eos(tiny_model):
    from transformers import AutoTokenizer

    from lightning_align.modules.episodes import stop_index

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    eos, stop = tokenizer.eos_token_id, "</tool_call>"

    def kept(text):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids[: stop_index(ids, tokenizer, eos, stop)], skip_special_tokens=False)

    assert kept('x<tool_call>{"a": 1}</tool_call>more</tool_call></s>') == 'x<tool_call>{"a": 1}</tool_call>'
    assert kept("answer</s><tool_call></tool_call>") == "answer</s>"
    assert kept("no end yet") == "no end yet"
    assert kept("</tool_call>") == "</tool_call>"


def test_dr_grpo_normalises_episodes_by_the_environments_token_budget(episodes):
    module, rollout = episodes
    module.loss_aggregation = "dr_grpo"
    rollout["advantages"] = torch.linspace(-1.0, 1.0, len(rollout["reward"]))
    rollout["loss_mask"] = rollout["mask"]
    loss, _ = module.minibatch_loss(rollout, slice(None), rollout["mask"].sum())
    # On-policy the ratio is 1: the loss is -sum(A * mask) over rows x the episode's budget (96), not per turn's 5.
    expected = -(rollout["advantages"][:, None] * rollout["mask"]).sum() / (len(rollout["mask"]) * 96)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda model, env: GRPOModule(model, environment=env, num_generations=2, max_new_tokens=5, beta=0.04),
        lambda model, env: GRPOModule(model, environment=env, advantage="rloo", num_generations=2, max_new_tokens=5),
        lambda model, env: GRPOModule(
            model, environment=env, advantage="reinforce++", num_generations=2, max_new_tokens=5
        ),
        lambda model, env: __import__("lightning_align").RLOOModule(model, environment=env, max_new_tokens=5),
    ],
    ids=["grpo", "grpo-rloo", "reinforce++", "RLOOModule"],
)
def test_every_estimator_learns_over_episodes(make, tiny_model, task_files, tmp_path):
    L.seed_everything(TEST_SEED)
    dm = task_prompts(tiny_model, task_files, batch_size=3)
    dm.setup("fit")
    module = ready(make(tiny_model, Scripted()), [], tmp_path)
    rollout = module.scored_rollout(module.sample_rollout(dm.collate(dm.train_set[:3]), module.num_generations))
    assert max(s.turns for s in rollout["episode_stats"]) == 3
    assert rollout["advantages"].abs().sum() > 0  # the episodes' different rewards reach the advantages
    loss = module.step_loss(rollout)
    loss.backward()
    gradients = [p.grad for p in module.model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and gradients and all(torch.isfinite(g).all() for g in gradients)
    assert sum(float(g.abs().sum()) for g in gradients) > 0


def test_a_chat_rows_episode_continues_its_conversation(tiny_model, tmp_path):
    from lightning_align import PromptDataModule
    from tests.conftest import write_jsonl

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "12+30?"}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": chat}, {"prompt": "7+8?"}])
    dm = PromptDataModule(tiny_model, str(path), batch_size=2, max_length=64, shuffle=False)
    dm.setup("fit")
    module = ready(GRPOModule(tiny_model, environment=Scripted(), num_generations=2, max_new_tokens=5), [], tmp_path)
    rollout = sample_episodes(module, dm.collate([dm.train_set[0], dm.train_set[1]]), module.environment, 2)
    width = rollout["prompt_length"]
    prompts = [
        module.tokenizer.decode(ids[:width][mask.bool()])
        for ids, mask in zip(rollout["sequences"], rollout["attention_mask"][:, :width])
    ]
    render = module.tokenizer.apply_chat_template
    assert prompts[0] == prompts[1] == render(chat, tokenize=False, add_generation_prompt=True)
    assert prompts[2] == render([{"role": "user", "content": "7+8?"}], tokenize=False, add_generation_prompt=True)


def test_without_the_samplers_log_probs_pi_old_comes_from_a_forward_pass(tiny_model, task_files, tmp_path):
    # model.generate (families outside the decode-loop grid) gives no log-probs: pi_old must not be zeros.
    L.seed_everything(TEST_SEED)
    dm = task_prompts(tiny_model, task_files, batch_size=3)
    module = GRPOModule(tiny_model, environment=Scripted(), num_generations=2, max_new_tokens=5, num_iterations=2)
    ready(module, [], tmp_path)
    generate = module.generate
    module.generate = lambda *args, **kwargs: (generate(*args, **kwargs)[0], None)
    rollout = module.sample_rollout(dm.collate(dm.train_set[:3]), 2)
    assert rollout["sampled_logprobs"] is None and max(s.turns for s in rollout["episode_stats"]) == 3
    rollout = module.scored_rollout(rollout)
    expected, _ = module.response_logps(module.model, rollout)
    mask = rollout["mask"].bool()
    torch.testing.assert_close(rollout["logprobs"][mask], expected[mask])
    assert (rollout["logprobs"][mask] < 0).all()
