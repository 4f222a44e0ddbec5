"""The DPO family against naive float64 formulas written out per example (sorting for AOT done by hand),
gradients included, and LD-DPO's length-desensitised log-probs against an explicit loop."""

import math

import pytest
import torch

from lightning_align.losses import DPO_LOSS_TYPES, dpo_loss, length_desensitised_logps

B, BETA, EPS, DELTA, TAU = 5, 0.3, 0.1, 0.2, 0.05


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x):
    return math.exp(log_sigmoid(x))


def naive(loss_type, pc, pr, rc, rr):
    """Per-example losses from plain floats."""
    a_plus = [pc[i] - rc[i] for i in range(B)]
    a_minus = [pr[i] - rr[i] for i in range(B)]
    h = [a_plus[i] - a_minus[i] for i in range(B)]
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            first, second = sorted(pc[i] - pr[i] for i in range(B)), sorted(rc[i] - rr[i] for i in range(B))
        else:
            first, second = sorted(a_plus), sorted(a_minus)
        d = [first[i] - second[i] for i in range(B)]
        return [-(1 - EPS) * log_sigmoid(BETA * x) - EPS * log_sigmoid(-BETA * x) for x in d]
    out = []
    for i in range(B):
        x, ap, am = h[i], a_plus[i], a_minus[i]
        if loss_type in ("sigmoid", "sigmoid_norm"):
            out.append(-log_sigmoid(BETA * x))
        elif loss_type == "ipo":
            out.append((x - 1 / (2 * BETA)) ** 2)
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - BETA * x))
        elif loss_type == "robust":
            out.append((-(1 - EPS) * log_sigmoid(BETA * x) + EPS * log_sigmoid(-BETA * x)) / (1 - 2 * EPS))
        elif loss_type == "exo_pair":
            q = sigmoid(BETA * x)
            out.append(q * math.log(q / (1 - EPS)) + (1 - q) * math.log((1 - q) / EPS))
        elif loss_type == "nca_pair":
            out.append(-log_sigmoid(BETA * ap) - 0.5 * log_sigmoid(-BETA * ap) - 0.5 * log_sigmoid(-BETA * am))
        elif loss_type == "bco_pair":
            out.append(-log_sigmoid(BETA * ap - DELTA) - log_sigmoid(-(BETA * am - DELTA)))
        elif loss_type == "sppo_hard":
            out.append((ap - 0.5 / BETA) ** 2 + (am + 0.5 / BETA) ** 2)
        elif loss_type == "apo_zero":
            out.append(1 - sigmoid(BETA * ap) + sigmoid(BETA * am))
        elif loss_type == "apo_down":
            out.append(sigmoid(BETA * ap) + 1 - sigmoid(BETA * x))
        elif loss_type == "discopop":
            m = sigmoid(BETA * x / TAU)
            out.append((1 - m) * -log_sigmoid(BETA * x) + m * math.exp(-BETA * x))
    return out


SMOOTHING = {"robust": EPS, "exo_pair": EPS, "aot": EPS, "aot_unpaired": EPS}


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_each_loss_type_and_its_gradient_match_the_written_out_formula(loss_type):
    g = torch.Generator().manual_seed(3)
    inputs = [(torch.randn(B, generator=g, dtype=torch.float64) * 3 - 20).requires_grad_() for _ in range(4)]
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        *inputs,
        beta=BETA,
        loss_type=loss_type,
        label_smoothing=SMOOTHING.get(loss_type, 0.0),
        bco_delta=DELTA,
        discopop_tau=TAU,
    )
    expected = naive(loss_type, *[x.tolist() for x in inputs])
    assert losses.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    grads = torch.autograd.grad(losses.sum(), inputs)
    step = 1e-6  # central differences of the written-out formula
    for k in range(len(inputs)):
        for i in range(B):
            values = [v.tolist() for v in inputs]
            values[k][i] += step
            up = sum(naive(loss_type, *values))
            values[k][i] -= 2 * step
            down = sum(naive(loss_type, *values))
            assert grads[k][i].item() == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(chosen_rewards, BETA * (inputs[0] - inputs[2]).detach())
    torch.testing.assert_close(rejected_rewards, BETA * (inputs[1] - inputs[3]).detach())


@pytest.mark.parametrize(
    "loss_type, smoothing, message",
    [
        ("exo_pair", 0.0, "needs 0 < label_smoothing < 1"),
        ("nca_pair", 0.1, "label_smoothing is not defined"),
        ("dpop", 0.0, "unknown loss_type 'dpop'"),
    ],
)
def test_settings_a_loss_does_not_define_are_refused(loss_type, smoothing, message):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(x, x, x, x, loss_type=loss_type, label_smoothing=smoothing)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_counts_the_shared_length_in_full_and_the_verbose_tail_by_alpha(alpha):
    g = torch.Generator().manual_seed(0)
    lengths = [4, 2, 3, 6, 3, 3]  # chosen rows 0-2, rejected rows 3-5
    rows = torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)])
    logps = torch.randn(len(rows), generator=g, dtype=torch.float64)
    # Packed scoring may list the rows in any order (each row's tokens in order): here rows 4, 0, 5, 2, 3, 1.
    listed = torch.cat([(rows == r).nonzero().squeeze(-1) for r in (4, 0, 5, 2, 3, 1)])
    chosen, rejected = length_desensitised_logps(logps[listed], rows[listed], 3, alpha)
    for pair in range(3):
        shared = min(lengths[pair], lengths[pair + 3])
        for side, result in ((pair, chosen), (pair + 3, rejected)):
            values = [logps[i].item() for i in range(len(rows)) if rows[i] == side]
            expected = sum(values[:shared]) + alpha * sum(values[shared:])
            assert result[pair].item() == pytest.approx(expected)


def test_orpo_odds_ratio_loss_matches_the_written_out_formula_with_gradients():
    from lightning_align.losses import orpo_loss

    g = torch.Generator().manual_seed(4)
    chosen = (-torch.rand(B, generator=g, dtype=torch.float64) * 3 - 1e-3).requires_grad_()  # mean token log-probs
    rejected = (-torch.rand(B, generator=g, dtype=torch.float64) * 3 - 1e-3).requires_grad_()

    def naive(c, r):
        log_odds = [(c[i] - math.log(1 - math.exp(c[i]))) - (r[i] - math.log(1 - math.exp(r[i]))) for i in range(B)]
        return [-log_sigmoid(x) for x in log_odds], log_odds

    losses, log_odds = orpo_loss(chosen, rejected)
    expected, expected_odds = naive(chosen.tolist(), rejected.tolist())
    assert losses.tolist() == pytest.approx(expected, rel=1e-9)
    assert log_odds.tolist() == pytest.approx(expected_odds, rel=1e-9)
    grad_c, grad_r = torch.autograd.grad(losses.sum(), [chosen, rejected])
    for i in range(B):
        for values, grad in ((chosen, grad_c), (rejected, grad_r)):
            up, down = values.detach().clone(), values.detach().clone()
            up[i] += 1e-6
            down[i] -= 1e-6
            pair = (up, rejected) if values is chosen else (chosen, up)
            pair_down = (down, rejected) if values is chosen else (chosen, down)
            numeric = (
                sum(naive(*[v.tolist() for v in pair])[0]) - sum(naive(*[v.tolist() for v in pair_down])[0])
            ) / 2e-6
            assert grad[i].item() == pytest.approx(numeric, rel=1e-5)


def test_kto_loss_and_reference_point_match_the_written_out_formula_with_gradients():
    from lightning_align.losses import kto_kl, kto_loss

    g = torch.Generator().manual_seed(5)
    policy = (torch.randn(B, generator=g, dtype=torch.float64) - 10).requires_grad_()
    ref = torch.randn(B, generator=g, dtype=torch.float64) - 10
    desirable = torch.tensor([True, False, True, True, False])
    kl_policy, kl_ref = (
        torch.randn(B, generator=g, dtype=torch.float64),
        torch.randn(B, generator=g, dtype=torch.float64),
    )
    z0 = kto_kl(kl_policy, kl_ref)
    assert z0.item() == pytest.approx(max(0.0, sum((kl_policy - kl_ref).tolist()) / B))
    assert kto_kl(kl_ref - 5, kl_ref).item() == 0  # clamped at zero
    losses, rewards = kto_loss(policy, ref, desirable, z0, BETA, 1.5, 0.7)

    def naive(p):
        out = []
        for i in range(B):
            r = p[i] - ref[i].item()
            if desirable[i]:
                out.append(1.5 * (1 - sigmoid(BETA * (r - z0.item()))))
            else:
                out.append(0.7 * (1 - sigmoid(BETA * (z0.item() - r))))
        return out

    assert losses.tolist() == pytest.approx(naive(policy.tolist()), rel=1e-10)
    assert rewards.tolist() == pytest.approx([BETA * (policy[i] - ref[i]).item() for i in range(B)])
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    for i in range(B):
        up, down = policy.tolist(), policy.tolist()
        up[i] += 1e-6
        down[i] -= 1e-6
        assert grad[i].item() == pytest.approx((sum(naive(up)) - sum(naive(down))) / 2e-6, rel=1e-5)


def test_wpo_weights_are_the_product_of_each_responses_aligned_mean_probability():
    from lightning_align.losses import wpo_weights

    g = torch.Generator().manual_seed(6)
    lengths = [3, 1, 2, 4]  # pairs (row 0, row 2) and (row 1, row 3)
    rows = torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)])
    logps = -torch.rand(len(rows), generator=g, dtype=torch.float64) * 2
    log_sum_sq = -torch.rand(len(rows), generator=g, dtype=torch.float64)
    weights = wpo_weights(logps, log_sum_sq, rows, 2)
    for pair in range(2):
        product = 1.0
        for row in (pair, pair + 2):
            terms = [logps[i].item() - log_sum_sq[i].item() for i in range(len(rows)) if rows[i] == row]
            product *= math.exp(sum(terms) / len(terms))
        assert weights[pair].item() == pytest.approx(product)


def naive_f_prime(kind: str, u: float, coef: float) -> float:
    """f'(u) of f-DPO's Table 1 (Wang et al. 2023) in the paper's own parametrisation; the paper's alpha is
    1 - TRL's f_alpha_divergence_coef. Constants that cancel in differences are left out."""
    if kind == "reverse_kl":
        return math.log(u)
    if kind == "forward_kl":
        return -1 / u
    if kind == "js_divergence":
        return math.log(2 * u / (1 + u))
    alpha = 1 - coef
    return (1 - u ** (-alpha)) / alpha


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "discopop"])
def test_f_divergence_scores_replace_the_log_ratios_as_f_dpo_writes_them(kind, loss_type):
    g = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(B, generator=g, dtype=torch.float64) * 0.8 - 20).requires_grad_() for _ in range(4)]
    coef = 0.3

    def written_out(pc, pr, rc, rr):
        out = []
        for i in range(B):
            h = naive_f_prime(kind, math.exp(pc[i] - rc[i]), coef) - naive_f_prime(kind, math.exp(pr[i] - rr[i]), coef)
            if loss_type == "sigmoid":
                out.append(-log_sigmoid(BETA * h))
            elif loss_type == "hinge":
                out.append(max(0.0, 1 - BETA * h))
            else:
                m = sigmoid(BETA * h / TAU)
                out.append((1 - m) * -log_sigmoid(BETA * h) + m * math.exp(-BETA * h))
        return out

    losses, _, _ = dpo_loss(
        *inputs, beta=BETA, loss_type=loss_type, discopop_tau=TAU, f_divergence_type=kind, f_alpha_divergence_coef=coef
    )
    assert losses.tolist() == pytest.approx(written_out(*[x.tolist() for x in inputs]), rel=1e-9, abs=1e-12)
    grads = torch.autograd.grad(losses.sum(), inputs)
    step = 1e-6
    for k in range(4):
        for i in range(B):
            values = [v.tolist() for v in inputs]
            values[k][i] += step
            up = sum(written_out(*values))
            values[k][i] -= 2 * step
            assert grads[k][i].item() == pytest.approx(
                (up - sum(written_out(*values))) / (2 * step), rel=1e-5, abs=1e-7
            )


def test_f_divergences_are_refused_for_losses_not_written_on_the_score_difference():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="f_divergence_type='forward_kl' applies to"):
        dpo_loss(x, x, x, x, loss_type="nca_pair", f_divergence_type="forward_kl")


def test_apo_zero_unpaired_is_kto_without_a_reference_point_with_gradients():
    from lightning_align.losses import kto_loss

    g = torch.Generator().manual_seed(6)
    policy = (torch.randn(B, generator=g, dtype=torch.float64) - 10).requires_grad_()
    ref = torch.randn(B, generator=g, dtype=torch.float64) - 10
    desirable = torch.tensor([True, False, True, False, False])

    def naive(p):  # APO-zero (D'Oosterlinck et al. 2024, eq. 7), one answer at a time
        return [
            (1.5 * (1 - sigmoid(BETA * (p[i] - ref[i].item()))))
            if desirable[i]
            else (0.7 * sigmoid(BETA * (p[i] - ref[i].item())))
            for i in range(B)
        ]

    losses, _ = kto_loss(policy, ref, desirable, torch.tensor(3.0), BETA, 1.5, 0.7, loss_type="apo_zero_unpaired")
    assert losses.tolist() == pytest.approx(naive(policy.tolist()), rel=1e-10)  # the KL point (3.0) is ignored
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    for i in range(B):
        up, down = policy.tolist(), policy.tolist()
        up[i] += 1e-6
        down[i] -= 1e-6
        assert grad[i].item() == pytest.approx((sum(naive(up)) - sum(naive(down))) / 2e-6, rel=1e-5)
