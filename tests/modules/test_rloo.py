"""RLOOModule (TRL's RLOO form) and GRPOModule's kl_in_reward / normalize_advantages: the advantages of a real
rollout against TRL's formula written out, the settings it fixes, and that it trains."""

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lightning_align import GRPOModule, RLOOModule
from tests.conftest import TEST_SEED, ready, task_prompts, trainer


def std(values):  # unbiased, as TRL's nanstd
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def abstain_on_every_third(prompts, completions):
    return [None if i % 3 == 2 else float(len(c)) for i, c in enumerate(completions)]


@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_take_the_k1_kl_into_the_reward_before_the_leave_one_out_baseline(
    normalize, tiny_model, task_files, tmp_path
):
    L.seed_everything(TEST_SEED)
    G, beta = 3, 0.05
    dm = task_prompts(tiny_model, task_files, batch_size=2)
    dm.setup("fit")
    module = RLOOModule(
        tiny_model, rewards=abstain_on_every_third, num_generations=G, beta=beta, normalize_advantages=normalize
    )
    ready(module, [], tmp_path)
    with torch.no_grad():  # the policy moves away from its reference, so the KL is not 0
        generator = torch.Generator().manual_seed(0)
        for parameter in module.model.parameters():
            parameter.add_(0.05 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
    rollout = module.rollout(dm.collate(dm.train_set[:2]))
    mask = rollout["mask"].double()
    kl = ((rollout["logprobs"].double() - rollout["ref_logprobs"].double()) * mask).sum(-1).tolist()
    reward = rollout["reward"].double().tolist()
    assert any(abs(k) > 1e-3 for k in kl) and any(r != r for r in reward)
    shaped = [r - beta * k for r, k in zip(reward, kl)]  # NaN (abstained) stays NaN
    expected = []
    for i, r in enumerate(shaped):
        group = [v for j, v in enumerate(shaped[i // G * G : i // G * G + G]) if v == v and j != i % G]
        expected.append(float("nan") if r != r or not group else r - sum(group) / len(group))
    if normalize:
        scored = [a for a in expected if a == a]
        mean, spread = sum(scored) / len(scored), std(scored)
        expected = [(a - mean) / (spread + 1e-4) if a == a else a for a in expected]
    expected = [0.0 if a != a else a for a in expected]
    expected = torch.tensor(expected, dtype=torch.float64)
    # Computed in float32: 1e-6 of rounding in a reward, divided by the batch's std when normalised.
    torch.testing.assert_close(rollout["advantages"].double(), expected, rtol=1e-4, atol=1e-4)


def test_rloo_module_refuses_the_settings_that_make_it_rloo(tiny_model):
    with pytest.raises(ValueError, match="RLOOModule sets importance_sampling_level itself"):
        RLOOModule(tiny_model, rewards=abstain_on_every_third, importance_sampling_level="token")
    with pytest.raises(ValueError, match="reinforce"):
        GRPOModule(tiny_model, rewards=abstain_on_every_third, advantage="reinforce++", kl_in_reward=True)


def test_rloo_module_trains_and_logs_its_kl(tiny_model, task_files, tmp_path):
    dm = task_prompts(tiny_model, task_files, batch_size=2)
    module = RLOOModule(tiny_model, rewards=abstain_on_every_third, num_generations=4, max_new_tokens=6)
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=0)
    fit.fit(module, datamodule=dm)
    stats = module.logged_rollout
    assert "kl" in stats and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    start = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    assert any(not torch.equal(p, start[n]) for n, p in module.model.state_dict().items())
