"""Every loss of the library as a pure tensor function, with its formula and source.

Conventions: `logits` are [batch, seq, vocab] and `labels` [batch, seq] with `ignore_index` on unscored positions.
Position t of the logits predicts token t+1, so functions taking both shift them inside.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log p(label_t | prefix) and the mask of scored positions, both [batch, seq-1].

    logp_t = logits[t-1, label_t] - logsumexp(logits[t-1, :]); unscored positions get 0.
    """
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log-softmax in at least float32
        logits = logits.float()
    mask = labels != ignore_index
    safe_labels = labels.masked_fill(~mask, 0)
    # Gather before normalising: never holds a second [batch, seq, vocab] tensor of log-probabilities.
    picked = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return logps * mask, mask


def sequence_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """Sum over scored tokens of log p(label_t | prefix), per sequence: [batch].

    sum_t m_t log p(y_t | y_<t), or with `average=True` that sum divided by sum_t m_t (length-normalised, as SimPO).
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    total = logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100, num_scored_tokens: Tensor | int | None = None):
    """Completion-only cross-entropy: -sum_t m_t log p(y_t | y_<t) / N.

    N is the number of scored tokens in this batch, or `num_scored_tokens` when the normaliser must span several
    micro-batches (gradient accumulation, data parallelism), so that every token weighs the same.
    """
    logps, mask = token_logps(logits, labels, ignore_index)
    normaliser = mask.sum() if num_scored_tokens is None else num_scored_tokens
    return -logps.sum() / torch.as_tensor(normaliser, dtype=logps.dtype, device=logps.device).clamp(min=1)


def predicting_positions(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Boolean [batch, seq]: positions whose next token is scored (position t predicts label t+1). Only there are
    logits needed for a completion-only loss."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != ignore_index
    return keep


def sft_loss_at(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, num_scored_tokens: Tensor | int | None = None
):
    """`sft_loss` from the logits of the predicting positions only: -sum_i log softmax(z_i)[y_i] / N.

    logits: [K, vocab] at `predicting_positions(labels)` in row-major order (what Hugging Face models return for
    a boolean `logits_to_keep`), so the [batch, seq, vocab] logits are never made; y: the K scored labels.
    """
    targets = labels[:, 1:][labels[:, 1:] != ignore_index]
    logits = logits.reshape(-1, logits.shape[-1])
    logps = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    total = -logps.gather(-1, targets.unsqueeze(-1)).sum()
    normaliser = targets.numel() if num_scored_tokens is None else num_scored_tokens
    return total / torch.as_tensor(normaliser, dtype=total.dtype, device=total.device).clamp(min=1)


def token_logps_at(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """log softmax(z_i)[y_i] for the logits of the predicting positions only (see `sft_loss_at`): [K], one per
    scored label in row-major order."""
    targets = labels[:, 1:][labels[:, 1:] != ignore_index]
    logits = logits.reshape(-1, logits.shape[-1])
    logps = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sequence_logps_at(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """`sequence_logps` from the logits of the predicting positions only (see `sft_loss_at`): per row b,
    sum_i [row(i) = b] log softmax(z_i)[y_i], or that sum over the row's scored-token count with `average`."""
    scored = labels[:, 1:] != ignore_index
    picked = token_logps_at(logits, labels, ignore_index)
    rows = scored.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)
    return sums / scored.sum(-1).clamp(min=1) if average else sums


# ----- the output layer and log-softmax, a chunk of positions at a time ------------------------------------------
def output_layer_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probabilities of the targets under the output layer, without the [positions, vocab] logits: [K].

    logp_i = z_i[y_i] - logsumexp_v z_i[v],  z_i = W h_i  (hidden [K, H], weight W [V, H], targets y [K]),
    computed `chunk_size` positions at a time (by default as many as make 2**22 logits, 16 MiB in float32), in
    float32 at least.
    The gradient with respect to h_i, W[y_i] - sum_v softmax(z_i)[v] W[v], is formed in the same pass (no logits
    are kept for the backward pass); when W itself is trained, the backward pass recomputes each chunk's logits
    for dL/dW = sum_i g_i (onehot(y_i) - softmax(z_i)) h_i^T.
    """
    return _OutputLayerLogps.apply(hidden, weight, targets, _chunk(chunk_size, weight), None, torch.is_grad_enabled())


def output_layer_nll(
    hidden: Tensor, weight: Tensor, targets: Tensor, normaliser: Tensor | int, chunk_size: int | None = None
) -> Tensor:
    """`sft_loss_at` from the hidden states of the predicting positions: -sum_i logp_i / N (logp_i as in
    `output_layer_logps`), without the [positions, vocab] logits. The loss is linear in each logp_i, so the
    gradients with respect to both h and W are formed in the forward pass and no chunk is recomputed."""
    scale = -1.0 / max(float(normaliser), 1.0)
    return _OutputLayerLogps.apply(hidden, weight, targets, _chunk(chunk_size, weight), scale, torch.is_grad_enabled())


def _chunk(chunk_size: int | None, weight: Tensor) -> int:
    return chunk_size or max(1, 2**22 // weight.shape[0])


class _OutputLayerLogps(torch.autograd.Function):
    """logp_i per position, or with `scale` the scalar scale * sum_i logp_i (see the two functions above).

    Matrix products run in the inputs' dtype (or autocast's), as the model's own output layer would; the
    log-softmax and the gradients' accumulation in float32 at least."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, scale, track):
        want_h, want_w = track and hidden.requires_grad, track and weight.requires_grad
        w_now = want_w and scale is not None  # the loss is linear in logp: W's gradient is known now
        device = hidden.device.type
        mm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        mm = torch.promote_types(mm, weight.dtype) if not torch.is_autocast_enabled(device) else mm
        acc = torch.promote_types(mm, torch.float32)
        logps = torch.empty(len(targets), dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if w_now else None
        with torch.autocast(device, enabled=False):
            w = weight.to(mm)
            for start in range(0, len(targets), chunk_size):
                rows = slice(start, start + chunk_size)
                h, y = hidden[rows].to(mm), targets[rows]
                z = (h @ w.T).to(acc)
                target_logit = z.gather(-1, y[:, None]).squeeze(-1)
                # One exp over the chunk, in place: it gives the log-sum-exp and, scaled, the softmax.
                peak = z.amax(-1, keepdim=True)
                e = z.sub_(peak).exp_()
                total = e.sum(-1, keepdim=True)
                lse[rows] = (peak + total.log()).squeeze(-1)
                logps[rows] = target_logit - lse[rows]
                if want_h or w_now:
                    dz = e.mul_(-1 / total).scatter_add_(-1, y[:, None], torch.ones_like(e[:, :1]))  # d logp / d z
                    if want_h:
                        grad_h[rows] = dz.to(mm) @ w
                    if w_now:
                        grad_w += dz.T.to(mm) @ h
        ctx.chunk_size, ctx.scale, ctx.dtypes = chunk_size, scale, (hidden.dtype, weight.dtype, mm)
        kept = (hidden, weight) if want_w and not w_now else (None, None)  # for the backward pass's recomputation
        ctx.save_for_backward(grad_h, grad_w, *kept, targets, lse)
        return logps if scale is None else logps.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, hidden, weight, targets, lse = ctx.saved_tensors
        h_dtype, w_dtype, mm = ctx.dtypes
        if ctx.scale is not None:  # a scalar loss: the stored gradients times d(loss)/d(output)
            factor = grad_out * ctx.scale
            d_hidden = None if grad_h is None else (grad_h * factor).to(h_dtype)
            d_weight = None if grad_w is None else (grad_w * factor).to(w_dtype)
            return d_hidden, d_weight, None, None, None, None
        d_hidden = None if grad_h is None else (grad_h * grad_out[:, None]).to(h_dtype)
        d_weight = None
        if weight is not None:  # W is trained and the loss is not linear in logp: recompute each chunk's softmax
            with torch.autocast(weight.device.type, enabled=False):
                w = weight.to(mm)
                d_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
                for start in range(0, len(targets), ctx.chunk_size):
                    rows = slice(start, start + ctx.chunk_size)
                    h = hidden[rows].to(mm)
                    dz = _onehot_minus_softmax((h @ w.T).to(lse.dtype), lse[rows], targets[rows])
                    d_weight += (dz * grad_out[rows, None].to(lse.dtype)).T.to(mm) @ h
            d_weight = d_weight.to(w_dtype)
        return d_hidden, d_weight, None, None, None, None


def _onehot_minus_softmax(logits: Tensor, lse: Tensor, targets: Tensor) -> Tensor:
    dz = logits.sub_(lse[:, None]).exp_().neg_()
    return dz.scatter_add_(-1, targets[:, None], torch.ones_like(dz[:, :1]))


def pairwise_reward_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry loss, mean of -log sigmoid(r+ - r- - m)  (Ouyang et al. 2022, eq. 1; margin as in Llama 2).

    chosen_rewards, rejected_rewards: [batch] scalar rewards; margin: optional [batch] required gap.
    """
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin
    return -F.logsigmoid(gap).mean()


DPO_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "exo_pair",
    "nca_pair",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
# Where label smoothing has a meaning (for "exo_pair" it is required: the target distribution's epsilon).
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust", "simpo", "exo_pair", "aot", "aot_unpaired")
# Losses defined on length-averaged log-probabilities (policy and reference).
LENGTH_AVERAGED_LOSS_TYPES = ("sigmoid_norm", "simpo", "orpo")


def check_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    """Refuse label smoothing for a loss that defines none, rather than ignore it."""
    if label_smoothing and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing is not defined for loss_type={loss_type!r}; it applies to "
            f"{', '.join(SMOOTHED_LOSS_TYPES)}"
        )
    if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
        raise ValueError(
            "loss_type='exo_pair' needs 0 < label_smoothing < 1 (the target distribution's epsilon; EXO's paper "
            f"uses 1e-3), got {label_smoothing}"
        )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    bco_delta: Tensor | float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on the log-ratios, per example: (losses, chosen_rewards, rejected_rewards).

    With a+ = log pi(y+|x) - log pi_ref(y+|x), a- likewise for y-, h = a+ - a- (all inputs [batch]) and
    eps = label_smoothing:
      "sigmoid":   -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
                   (DPO, Rafailov et al. 2023; eps > 0 is conservative DPO, cDPO)
      "ipo":       (h - 1 / (2 beta))^2                              (IPO, Azar et al. 2023, eq. 17; its authors, and
                   TRL, use length-averaged log-probs here: `DPOModule(ipo_normalize=True)`)
      "hinge":     relu(1 - beta h)                                  (SLiC, Zhao et al. 2023)
      "robust":    (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)
                   (rDPO, Chowdhury et al. 2024: unbiased when a share eps of the labels is flipped; eps < 1/2)
      "exo_pair":  q log(q / (1 - eps)) + (1 - q) log((1 - q) / eps), q = sigmoid(beta h)
                   (EXO, Ji et al. 2024, eq. 16 with K = 2: KL(p_model || p_target) over {y+, y-}; eps > 0 needed)
      "nca_pair":  -log sigmoid(beta a+) - 1/2 log sigmoid(-beta a+) - 1/2 log sigmoid(-beta a-)
                   (NCA, Chen et al. 2024, pairwise form)
      "bco_pair":  -log sigmoid(beta a+ - delta) - log sigmoid(-(beta a- - delta))
                   (BCO, Jung et al. 2024: delta is a running mean of the implicit rewards, `bco_delta`; TRL's
                   bco_pair uses delta = 0, which `bco_delta=0` gives)
      "sppo_hard": (a+ - 1 / (2 beta))^2 + (a- + 1 / (2 beta))^2     (SPPO, Wu et al. 2024, eq. 4.7 with hard
                   win probabilities 1 and 0)
      "aot":       -(1 - eps) log sigmoid(beta d_i) - eps log sigmoid(-beta d_i), d = sort(l) - sort(l_ref) over the
                   batch, l = log pi(y+) - log pi(y-), l_ref likewise (AOT, Melnyk et al. 2024, paired: the
                   policy's margins dominate the reference's in distribution)
      "aot_unpaired": the same with d = sort(a+) - sort(a-) (AOT for unpaired data)
      "apo_zero":  (1 - sigmoid(beta a+)) + sigmoid(beta a-)         (APO-zero, D'Oosterlinck et al. 2024, eq. 7:
                   chosen answers better than the model's own)
      "apo_down":  sigmoid(beta a+) + (1 - sigmoid(beta h))          (APO-down, eq. 8: chosen answers worse)
      "discopop":  (1 - m) (-log sigmoid(beta h)) + m exp(-beta h), m = sigmoid(beta h / tau)
                   (DiscoPOP's log-ratio modulated loss, Chris Lu et al. 2024, eq. 5; tau = `discopop_tau`)
      "sigmoid_norm": -log sigmoid(beta h) on length-averaged log-probs (the module passes averages)
    Rewards are the implicit rewards beta a+ and beta a-, detached. Label smoothing is refused where it has no
    meaning (`SMOOTHED_LOSS_TYPES`).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES + ('simpo', 'sft'))}")
    check_label_smoothing(loss_type, label_smoothing)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        q_log, not_q_log = F.logsigmoid(beta * h), F.logsigmoid(-beta * h)
        losses = q_log.exp() * (q_log - math.log1p(-eps)) + not_q_log.exp() * (not_q_log - math.log(eps))
    elif loss_type == "nca_pair":
        chosen, rejected = beta * chosen_ratio, beta * rejected_ratio
        losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(beta * chosen_ratio - bco_delta) - F.logsigmoid(-(beta * rejected_ratio - bco_delta))
    elif loss_type == "sppo_hard":
        losses = (chosen_ratio - 1 / (2 * beta)) ** 2 + (rejected_ratio + 1 / (2 * beta)) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            margins = policy_chosen_logps - policy_rejected_logps
            delta = margins.sort().values - (ref_chosen_logps - ref_rejected_logps).sort().values
        else:
            delta = chosen_ratio.sort().values - rejected_ratio.sort().values
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_ratio)) + torch.sigmoid(beta * rejected_ratio)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(beta * chosen_ratio) + (1 - torch.sigmoid(beta * h))
    else:  # discopop
        modulation = torch.sigmoid(beta * h / discopop_tau)
        losses = (1 - modulation) * -F.logsigmoid(beta * h) + modulation * torch.exp(-beta * h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4-7), reference-free, per example: (losses, log_odds_ratio).

    With length-averaged log-probabilities l = (1/|y|) log P(y|x) (the inputs, [batch]), log odds(y|x) =
    l - log(1 - exp(l)), and losses = -log sigmoid(log odds(y+|x) - log odds(y-|x)). ORPO's objective adds
    lambda times this to the chosen responses' NLL (`DPOModule(loss_type=["orpo", "sft"])`, `ORPOModule`).
    """
    log_odds = (policy_chosen_logps - _log1mexp(policy_chosen_logps)) - (
        policy_rejected_logps - _log1mexp(policy_rejected_logps)
    )
    return -F.logsigmoid(log_odds), log_odds.detach()


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 8), per example: (losses, rewards).

    r = log pi(y|x) - log pi_ref(y|x) (inputs [batch]; `desirable` [batch] bool), z0 = `kl` the reference point
    (`kto_kl`, detached), and losses = lambda_D (1 - sigmoid(beta (r - z0))) for desirable answers,
    lambda_U (1 - sigmoid(beta (z0 - r))) for undesirable ones. Rewards are beta r, detached.
    """
    ratio = policy_logps - ref_logps
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))
    weights = torch.where(desirable, value.new_tensor(desirable_weight), value.new_tensor(undesirable_weight))
    return weights * (1 - value), beta * ratio.detach()


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean_j (log pi(y_j'|x_j) - log pi_ref(y_j'|x_j))), estimated on mismatched
    prompt / answer pairs of the batch (the paper's biased but practical estimate; no gradient flows through it)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def wpo_weights(token_logps: Tensor, token_log_sum_sq: Tensor, rows: Tensor, num_pairs: int) -> Tensor:
    """WPO's pair weights (Zhou et al. 2024, "WPO", eq. 2 with sampled alignment): [pairs], detached.

    Per response y: w(y) = exp((1/|y|) sum_t (log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2)): how likely the
    policy itself is to produce y, normalised by how peaked its next-token distributions are; a pair weighs
    w(y+) w(y-), so pairs far from the policy's own outputs count less. `token_logps`, `token_log_sum_sq` and
    `rows` [K] per scored token (rows 0..P-1 chosen, P..2P-1 rejected).
    """
    rows = rows.to(token_logps.device)
    totals = torch.zeros(2 * num_pairs, dtype=token_logps.dtype, device=token_logps.device)
    totals = totals.index_add(0, rows, (token_logps - token_log_sum_sq).detach())
    counts = torch.bincount(rows, minlength=2 * num_pairs).clamp(min=1)
    chosen, rejected = torch.exp(totals / counts).chunk(2)
    return chosen * rejected


def length_desensitised_logps(token_logps: Tensor, rows: Tensor, num_pairs: int, alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's sequence log-probs (Liu et al. 2024, "LD-DPO", eq. 9): (chosen [pairs], rejected [pairs]).

    For a pair whose responses have l+ and l- scored tokens, each response's first min(l+, l-) tokens count in
    full and the rest ("verbose" tokens) with weight alpha: log p = sum_{t <= l_min} log p_t + alpha
    sum_{t > l_min} log p_t. alpha = 1 is plain DPO; the paper uses 0 < alpha < 1. `token_logps` [K] and `rows`
    [K] (the batch row of each scored token; rows 0..P-1 chosen, P..2P-1 rejected, each row's tokens in order).
    """
    order = torch.sort(rows, stable=True).indices
    token_logps, rows = token_logps[order], rows[order]
    lengths = torch.bincount(rows, minlength=2 * num_pairs)
    starts = lengths.cumsum(0) - lengths
    position = torch.arange(len(rows), device=rows.device) - starts[rows]
    shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
    weights = torch.where(position < shared[rows], 1.0, alpha).to(token_logps.dtype)
    sums = torch.zeros(2 * num_pairs, dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps * weights).chunk(2)


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO, reference-free (Meng et al. 2024, eq. 6), per example: (losses, chosen_rewards, rejected_rewards).

    z = beta avg_logp(y+|x) - beta avg_logp(y-|x) - gamma, where the inputs are length-averaged log-probabilities
    (`sequence_logps(..., average=True)`) and gamma is the target reward margin;
    losses = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z), eps = label_smoothing (0 in the paper; the
    smoothed form is the one TRL's CPO trainer uses for SimPO). Rewards are beta * avg_logp of each response,
    detached.
    """
    chosen_rewards = beta * policy_chosen_logps
    rejected_rewards = beta * policy_rejected_logps
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


# ----- PPO (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019, Ouyang et al. 2022) ----------------------
# Per-token tensors are [batch, response_length]; `mask` is 1 on response tokens and 0 on padding.


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x * m) / sum(m)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, with the unbiased (Bessel-corrected) variance.

    With `shift_mean=False` the mean is added back: the scale is normalised, the sign kept (used for rewards).
    """
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    count = mask.sum()
    variance = (((x - mean) ** 2) * mask).sum() / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(variance + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimator of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating KL divergence").

    With d = log pi - log pi_ref:  "k1": d (unbiased, can be negative per token);  "k2": d^2 / 2;
    "k3": exp(-d) - 1 + d (unbiased and never negative).
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d**2
    if kind == "k3":
        return torch.expm1(-d) + d
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), per token: (advantages, returns).

    delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t,  A_t = delta_t + gamma lam m_{t+1} A_{t+1},  returns = A + V;
    the value after the last response token is 0, and masked positions get 0.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t] * mask[:, t]
    return advantages.detach(), ((advantages + values) * mask).detach()


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: (loss, clipfrac, approx_kl), each a masked mean over tokens.

    ratio = exp(log pi - log pi_old);  loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)));
    clipfrac = share of tokens where the clipped term is the larger; approx_kl = mean((log pi - log pi_old)^2 / 2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    approx_kl = masked_mean(0.5 * log_ratio.detach() ** 2, mask)
    return loss, clipfrac.detach(), approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2) -> Tensor:
    """Clipped value loss: 0.5 mean(max((V - R)^2, (V_clip - R)^2)), V_clip = V_old + clip(V - V_old, -eps, eps)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


# ----- critic-free online RL: GRPO, RLOO, REINFORCE++ ---------------------------------------------------------------
# Rewards are [batch] with a group's samples next to each other (prompt i's samples at i*G .. i*G+G-1); a NaN reward
# means every reward source abstained on that sample: it is left out of means and deviations and gets advantage 0.

SCALE_REWARDS = ("group", "batch", "none")
LOSS_AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def _nanstd(x: Tensor, dim=None, keepdim: bool = False) -> Tensor:
    """Unbiased standard deviation over the non-NaN entries (0 where fewer than two)."""
    count = (~x.isnan()).sum(dim=dim, keepdim=True) if dim is not None else (~x.isnan()).sum()
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    squares = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) if dim is not None else torch.nansum((x - mean) ** 2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return std if keepdim or dim is None else std.squeeze(dim)


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group", eps: float = 1e-4) -> Tensor:
    """GRPO's advantages (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision): [batch].

    A_i = (r_i - mean_{j in group(i)} r_j) / (s + eps), s = the group's standard deviation ("group"), the whole
    batch's ("batch", as Liu et al. 2025 suggest against the group std's difficulty bias), or 1 with eps = 0
    ("none": Dr. GRPO). Standard deviations are unbiased (Bessel-corrected), as TRL computes them.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        centred = centred / (_nanstd(grouped, dim=1, keepdim=True).expand_as(grouped).reshape(-1) + eps)
    elif scale_rewards == "batch":
        centred = centred / (_nanstd(rewards) + eps)
    return torch.nan_to_num(centred, nan=0.0)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out (Kool et al. 2019; Ahmadian et al. 2024): [batch].

    A_i = r_i - 1/(n_i - 1) sum_{j in group(i), j != i} r_j, over the group's n_i scored samples (abstained ones,
    NaN, are left out and get 0); 0 when a sample has no other scored sample to compare with.
    """
    grouped = rewards.view(-1, group_size)
    scored = ~grouped.isnan()
    total = torch.nansum(grouped, dim=1, keepdim=True)
    others = (scored.sum(1, keepdim=True) - 1).clamp(min=1)
    baseline = (total - torch.nan_to_num(grouped)) / others
    advantages = torch.where(scored & (scored.sum(1, keepdim=True) > 1), grouped - baseline, 0.0)
    return advantages.view(-1)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """REINFORCE++ (Hu 2025): [batch, response] advantages from per-token rewards, no critic.

    G_t = sum_{s >= t} r_s m_s  (gamma = 1: the return to go), then A = (G - mean) / sqrt(var + 1e-8) over every
    response token of the batch (`whiten`: the global-batch normalisation that replaces a critic's baseline).
    The per-token rewards carry the KL shaping, r_t = -beta KL_t, plus the sample's score at its last token.
    """
    mask = mask.to(token_rewards.dtype)
    returns = (token_rewards * mask).flip(-1).cumsum(-1).flip(-1) * mask
    return whiten(returns, mask) * mask


def combined_rewards(
    rewards: Tensor, weights: Tensor, aggregation: str = "sum_then_normalize", group_size: int = 1, eps: float = 1e-4
) -> Tensor:
    """One reward per sample from K reward sources: [batch, K] (NaN: the source abstained) -> [batch].

    "sum_then_normalize": R = sum_k w_k r_k over the sources that scored the sample;
    "normalize_then_sum": R = sum_k w_k (r_k - mean_g r_k) / (std_g r_k + eps), each source normalised over the
    sample's group g (GDPO, Liu et al. 2026: sources on different scales keep their own resolution; with a group
    of 1, over the batch). R is NaN where every source abstained; the advantage estimator normalises R further.
    """
    if aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"unknown reward aggregation {aggregation!r}; valid: {', '.join(REWARD_AGGREGATIONS)}")
    if aggregation == "normalize_then_sum":
        group = group_size if group_size > 1 else rewards.shape[0]
        grouped = rewards.view(-1, group, rewards.shape[1])
        mean = torch.nanmean(grouped, dim=1, keepdim=True)
        rewards = ((grouped - mean) / (_nanstd(grouped, dim=1, keepdim=True) + eps)).view_as(rewards)
    total = torch.nansum(rewards * weights.to(rewards), dim=1)
    return torch.where(rewards.isnan().all(1), torch.nan, total)


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    aggregation: str = "grpo",
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate of GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ with the loss aggregation of each.

    Per token: rho = exp(log pi - log pi_old), l_t = -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)
    + beta k3_t with k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (DeepSeekMath eq. 4); A is
    [batch] (one advantage per sample) or [batch, response]; eps_high defaults to eps (DAPO's clip-higher sets it
    larger). Aggregation over the masked tokens:
      "grpo":    mean_i (sum_t l_it / |o_i|)                    (per-sequence mean; Shao et al. 2024)
      "dr_grpo": sum_it l_it / (batch * max_completion_length) (a constant normaliser; Liu et al. 2025)
      "dapo":    sum_it l_it / num_tokens                        (token-level; Yu et al. 2025), num_tokens defaults to
                 this batch's token count; pass the generation batch's, divided by its mini-batches, to weigh
                 every token of it equally across mini-batches.
    Returns the loss and detached statistics: clipfrac (share of tokens clipped), approx_kl, and kl (mean k3,
    with a reference).
    """
    if aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {aggregation!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
    mask = mask.to(logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = epsilon if epsilon_high is None else epsilon_high
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    stats = {
        "clipfrac": masked_mean((clipped < unclipped).to(logprobs.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    }
    if ref_logprobs is not None and beta != 0:
        kl = kl_penalty(logprobs, ref_logprobs, "k3")
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    summed = per_token * mask
    if aggregation == "grpo":
        loss = (summed.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif aggregation == "dr_grpo":
        loss = summed.sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
    else:
        loss = summed.sum() / (mask.sum() if num_tokens is None else torch.as_tensor(num_tokens)).clamp(min=1)
    return loss, stats
