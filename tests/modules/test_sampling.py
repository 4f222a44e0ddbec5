"""The rollout sampler's draws follow softmax(logits / temperature) with top-k and nucleus (top-p) filtering, as
`generate`'s logits processors define them (its decode loop is compared with `generate` in the architecture grid)."""

import pytest
import torch

from lightning_align.modules.sampling import next_tokens


def expected_distribution(logits, temperature, top_k, top_p):
    """Naively: softmax, then keep the top_k most likely, then the smallest most-likely set reaching top_p."""
    probs = torch.softmax(logits.double() / temperature, -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k else order
    nucleus, mass = [], 0.0
    total = sum(probs[i] for i in kept)
    for i in kept:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += probs[i] / total if top_k else probs[i]
    weight = sum(probs[i] for i in nucleus)
    return [probs[i] / weight if i in nucleus else 0.0 for i in range(len(probs))]


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 4, 0.9)]
)
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])
    draws = 40_000
    tokens = next_tokens(logits.expand(draws, -1), temperature, top_k, top_p)
    frequencies = torch.bincount(tokens, minlength=len(logits)).double() / draws
    expected = torch.tensor(expected_distribution(logits, temperature, top_k, top_p), dtype=torch.float64)
    assert ((frequencies > 0) == (expected > 0)).all()  # filtered tokens are never drawn
    torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)  # 4 standard errors at 40k draws


def test_greedy_takes_the_most_likely_token():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert next_tokens(logits, greedy=True).tolist() == [1, 0]
