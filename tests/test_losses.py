"""Each loss against a deliberately naive float64 version written here: loops over batch and tokens."""

import math

import pytest
import torch

from lightning_align.losses import pairwise_reward_loss, sequence_logps, sft_loss


def naive_token_logps(logits, labels):
    """log softmax written out per position, label t predicted from position t-1."""
    out = []
    for b in range(logits.shape[0]):
        row = []
        for t in range(1, logits.shape[1]):
            if labels[b, t] == -100:
                continue
            scores = logits[b, t - 1]
            log_norm = torch.log(sum(torch.exp(s) for s in scores))
            row.append(scores[labels[b, t]] - log_norm)
        out.append(row)
    return out


def random_batch(seed=0, batch=3, seq=7, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[:, :2] = -100  # a prompt
    labels[0, -2:] = -100  # padding
    labels[2, 3] = -100  # a hole
    return logits, labels


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_naive_loop_with_gradients(average):
    logits, labels = random_batch()
    ours_logits = logits.clone().requires_grad_(True)
    ref_logits = logits.clone().requires_grad_(True)
    ours = sequence_logps(ours_logits, labels, average=average)
    per_seq = naive_token_logps(ref_logits, labels)
    ref = torch.stack([sum(r) / (len(r) if average else 1) for r in per_seq])
    torch.testing.assert_close(ours, ref)
    weights = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    (ours * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad)


def test_sft_loss_is_mean_nll_over_scored_tokens_with_gradients():
    logits, labels = random_batch(seed=1)
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    ours = sft_loss(a, labels)
    tokens = [lp for row in naive_token_logps(b, labels) for lp in row]
    ref = -sum(tokens) / len(tokens)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sft_loss_with_external_normaliser_divides_the_sum_by_it():
    logits, labels = random_batch(seed=2)
    tokens = [lp for row in naive_token_logps(logits, labels) for lp in row]
    torch.testing.assert_close(sft_loss(logits, labels, num_scored_tokens=40), -sum(tokens) / 40)


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_reward_loss_matches_bradley_terry_formula(with_margin):
    g = torch.Generator().manual_seed(3)
    chosen = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, generator=g, dtype=torch.float64) if with_margin else None
    ours = pairwise_reward_loss(chosen, rejected, margin)
    ref = 0.0
    for i in range(5):
        gap = chosen[i] - rejected[i] - (margin[i] if with_margin else 0.0)
        ref = ref - torch.log(1 / (1 + torch.exp(-gap)))
    ref = ref / 5
    torch.testing.assert_close(ours, ref)
    grads = torch.autograd.grad(ours, (chosen, rejected))
    ref_grads = torch.autograd.grad(ref, (chosen, rejected))
    for g_ours, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref)
    assert math.isfinite(ours.item())


def naive_log_sigmoid(x):
    return -torch.log(1 + torch.exp(-x))


def naive_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    out = []
    for i in range(len(pc)):
        h = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            out.append(-(1 - eps) * naive_log_sigmoid(beta * h) - eps * naive_log_sigmoid(-beta * h))
        elif loss_type == "ipo":
            out.append((h - 1 / (2 * beta)) * (h - 1 / (2 * beta)))
        elif loss_type == "hinge":
            out.append(torch.clamp(1 - beta * h, min=0))
        elif loss_type == "robust":
            out.append((-(1 - eps) * naive_log_sigmoid(beta * h) + eps * naive_log_sigmoid(-beta * h)) / (1 - 2 * eps))
    return torch.stack(out)


def random_logps(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return [(-10 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_naive_formula_with_gradients(loss_type, label_smoothing, beta):
    from lightning_align.losses import dpo_loss

    inputs = random_logps(seed=len(loss_type) * 100 + int(label_smoothing * 10) * 10 + int(beta * 10))
    if label_smoothing and loss_type in ("ipo", "hinge"):  # no smoothed form exists: refused, not ignored
        with pytest.raises(ValueError, match=f"label_smoothing is not defined for loss_type='{loss_type}'"):
            dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        return
    losses, chosen_r, rejected_r = dpo_loss(*inputs, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    ref = naive_dpo(*inputs, beta, loss_type, label_smoothing)
    torch.testing.assert_close(losses, ref)
    for i in range(len(losses)):
        assert chosen_r[i].item() == pytest.approx(beta * (inputs[0][i] - inputs[2][i]).item())
        assert rejected_r[i].item() == pytest.approx(beta * (inputs[1][i] - inputs[3][i]).item())
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    grads = torch.autograd.grad(losses.sum(), inputs)
    ref_grads = torch.autograd.grad(ref.sum(), inputs)
    for g_ours, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref)


def test_dpo_loss_rejects_unknown_loss_type_listing_valid_ones():
    from lightning_align.losses import dpo_loss

    with pytest.raises(
        ValueError, match="unknown loss_type 'kto'; valid: sigmoid, ipo, hinge, robust, exo_pair, .*simpo, sft"
    ):
        dpo_loss(*random_logps(0), loss_type="kto")


def test_sigmoid_dpo_at_equal_policy_and_reference_is_log_2():
    from lightning_align.losses import dpo_loss

    logps = torch.randn(4, dtype=torch.float64)
    losses, _, _ = dpo_loss(logps, logps - 1, logps, logps - 1)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))


@pytest.mark.parametrize("gamma", [0.0, 0.7])
@pytest.mark.parametrize("eps", [0.0, 0.15])
def test_simpo_loss_matches_naive_formula_with_gradients(gamma, eps):
    from lightning_align.losses import simpo_loss

    chosen, rejected = random_logps(5)[:2]
    losses, chosen_r, rejected_r = simpo_loss(chosen, rejected, beta=2.0, gamma=gamma, label_smoothing=eps)
    ref = []
    for i in range(6):
        z = 2.0 * chosen[i] - 2.0 * rejected[i] - gamma
        ref.append(-(1 - eps) * naive_log_sigmoid(z) - eps * naive_log_sigmoid(-z))
    ref = torch.stack(ref)
    torch.testing.assert_close(losses, ref)
    torch.testing.assert_close(chosen_r, 2.0 * chosen.detach())
    grads = torch.autograd.grad(losses.sum(), (chosen, rejected))
    ref_grads = torch.autograd.grad(ref.sum(), (chosen, rejected))
    for g_ours, g_ref in zip(grads, ref_grads):
        torch.testing.assert_close(g_ours, g_ref)


def test_sft_loss_at_the_predicting_positions_equals_the_full_sft_loss_with_gradients():
    from lightning_align.losses import predicting_positions, sft_loss_at

    torch.manual_seed(3)
    logits = torch.randn(3, 7, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[1, :2] = -100
    labels[1, 5:] = -100
    labels[2, :6] = -100
    keep = predicting_positions(labels)
    kept = logits[keep]  # [K, vocab], row-major, as a model returns for a boolean logits_to_keep
    ours = sft_loss_at(kept, labels)
    total, count = 0.0, 0
    for b in range(3):  # explicit loop: position t predicts label t + 1
        for t in range(6):
            if labels[b, t + 1] != -100:
                total = total - torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
                count += 1
    naive = total / count
    torch.testing.assert_close(ours, naive)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_naive,) = torch.autograd.grad(naive, logits)
    torch.testing.assert_close(g_ours, g_naive)
    torch.testing.assert_close(ours, sft_loss(logits, labels))


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_at_the_predicting_positions_equals_sequence_logps_with_gradients(average):
    from lightning_align.losses import predicting_positions, sequence_logps_at

    torch.manual_seed(4)
    logits = torch.randn(4, 6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (4, 6))
    labels[:, :2] = -100
    labels[1, 4:] = -100
    labels[3, :5] = -100
    ours = sequence_logps_at(logits[predicting_positions(labels)], labels, average=average)
    naive = []
    for b in range(4):  # explicit loop over the scored tokens of each row
        terms = [torch.log_softmax(logits[b, t], -1)[labels[b, t + 1]] for t in range(5) if labels[b, t + 1] != -100]
        naive.append(sum(terms) / (len(terms) if average else 1))
    naive = torch.stack(naive)
    torch.testing.assert_close(ours, naive)
    torch.testing.assert_close(ours, sequence_logps(logits, labels, average=average))
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    (g_naive,) = torch.autograd.grad(naive.sum(), logits)
    torch.testing.assert_close(g_ours, g_naive)


def naive_output_layer_logps(hidden, weight, targets):
    """Per position: the logits as explicit dot products, then log softmax written out."""
    out = []
    for i in range(hidden.shape[0]):
        logits = [sum(hidden[i, k] * weight[v, k] for k in range(hidden.shape[1])) for v in range(weight.shape[0])]
        log_norm = torch.log(sum(torch.exp(z) for z in logits))
        out.append(logits[targets[i]] - log_norm)
    return torch.stack(out)


def output_layer_case(seed=0, positions=7, width=5, vocab=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(positions, width, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (positions,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("weight_trained", [True, False])
@pytest.mark.parametrize("chunk_size", [3, 100])  # several chunks, and one
def test_output_layer_logps_match_naive_loop_with_gradients(weight_trained, chunk_size):
    from lightning_align.losses import output_layer_logps

    hidden, weight, targets = output_layer_case()
    upstream = torch.linspace(-1.0, 2.0, len(targets), dtype=torch.float64)  # a loss that is not linear in logp

    def run(fn):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(weight_trained)
        logps = fn(h, w, targets)
        (torch.sigmoid(logps) * upstream).sum().backward()
        return logps.detach(), h.grad, w.grad

    ours = run(lambda h, w, y: output_layer_logps(h, w, y, chunk_size=chunk_size))
    naive = run(naive_output_layer_logps)
    torch.testing.assert_close(ours[0], naive[0])
    torch.testing.assert_close(ours[1], naive[1])
    if weight_trained:
        torch.testing.assert_close(ours[2], naive[2])
    else:
        assert ours[2] is None


@pytest.mark.parametrize("chunk_size", [2, 100])
def test_output_layer_nll_matches_naive_mean_nll_with_gradients(chunk_size):
    from lightning_align.losses import output_layer_nll

    hidden, weight, targets = output_layer_case(seed=1)

    def run(fn):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = fn(h, w)
        (3.0 * loss).backward()  # the stored gradients are scaled by the upstream one
        return loss.detach(), h.grad, w.grad

    ours = run(lambda h, w: output_layer_nll(h, w, targets, normaliser=10, chunk_size=chunk_size))
    naive = run(lambda h, w: -naive_output_layer_logps(h, w, targets).sum() / 10)
    for mine, theirs in zip(ours, naive):
        torch.testing.assert_close(mine, theirs)


def test_output_layer_nll_hands_its_weight_gradient_on_once_and_says_so_if_asked_twice():
    from lightning_align.losses import output_layer_nll

    hidden, weight, targets = output_layer_case(seed=1)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = output_layer_nll(h, w, targets, normaliser=10, chunk_size=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran a second time"):
        loss.backward()
    # No scored position: a zero weight gradient, as a plain output layer's.
    w.grad = None
    output_layer_nll(h, w, targets[:0], normaliser=1).backward()
    assert w.grad is not None and not w.grad.any()


def test_output_layer_logps_without_grad_tracking_are_the_same_values():
    from lightning_align.losses import output_layer_logps

    hidden, weight, targets = output_layer_case(seed=2)
    with torch.no_grad():
        untracked = output_layer_logps(hidden.requires_grad_(True), weight, targets, chunk_size=3)
    assert not untracked.requires_grad
    torch.testing.assert_close(untracked, naive_output_layer_logps(hidden.detach(), weight, targets))


def test_token_logps_at_the_predicting_positions_match_the_naive_loop():
    from lightning_align.losses import predicting_positions, token_logps_at

    logits, labels = random_batch(seed=3)
    ours = token_logps_at(logits[predicting_positions(labels)], labels)
    naive = [logp for row in naive_token_logps(logits, labels) for logp in row]
    torch.testing.assert_close(ours, torch.stack(naive))
