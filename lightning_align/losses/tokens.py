"""Token log-probs, the SFT loss, and the output layer with its log-softmax a chunk of positions at a time.

Conventions: `logits` are [batch, seq, vocab] and `labels` [batch, seq] with `ignore_index` on unscored positions.
Position t of the logits predicts token t+1, so functions taking both shift them inside.
"""

from __future__ import annotations

import torch
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
# Logits per chunk: 2**23 (32 MiB in float32) took 8-10% less time than 2**22 for the output layer of a 32,000-word
# vocabulary on a CPU (fewer passes over the [vocab, hidden] gradient, fewer small products); larger gained little.
CHUNK_LOGITS = 2**23


def output_layer_logps(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None) -> Tensor:
    """Log-probabilities of the targets under the output layer, without the [positions, vocab] logits: [K].

    logp_i = z_i[y_i] - logsumexp_v z_i[v],  z_i = W h_i  (hidden [K, H], weight W [V, H], targets y [K]),
    computed `chunk_size` positions at a time (by default as many as make `CHUNK_LOGITS` logits, 32 MiB in float32), in
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
    return chunk_size or max(1, CHUNK_LOGITS // weight.shape[0])


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
        grad_w = None
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
                        grad_w = _add_product(grad_w, dz.T.to(mm), h, acc)
        if w_now and grad_w is None:  # no scored position: a zero gradient, as the model's own output layer gives
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        ctx.chunk_size, ctx.scale, ctx.dtypes = chunk_size, scale, (hidden.dtype, weight.dtype, mm)
        kept = (hidden, weight) if want_w and not w_now else (None, None)  # for the backward pass's recomputation
        ctx.save_for_backward(grad_h, *kept, targets, lse)
        # Not a saved tensor: the backward pass scales it in place and hands it on as the weight's gradient, which
        # needs it referenced nowhere else (else a [vocab, hidden] copy). So this graph's backward runs once.
        ctx.grad_w, ctx.w_now = grad_w, w_now
        return logps if scale is None else logps.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, hidden, weight, targets, lse = ctx.saved_tensors
        grad_w, ctx.grad_w = ctx.grad_w, None
        if ctx.w_now and grad_w is None:
            raise RuntimeError(
                "output_layer_nll's backward pass ran a second time over one forward (retain_graph): it hands its "
                "weight gradient on instead of keeping it; run the forward again"
            )
        h_dtype, w_dtype, mm = ctx.dtypes
        if ctx.scale is not None:  # a scalar loss: the stored gradients times d(loss)/d(output)
            factor = grad_out * ctx.scale
            d_hidden = None if grad_h is None else (grad_h * factor).to(h_dtype)
            d_weight = None if grad_w is None else grad_w.mul_(factor).to(w_dtype)
            return d_hidden, d_weight, None, None, None, None
        d_hidden = None if grad_h is None else (grad_h * grad_out[:, None]).to(h_dtype)
        d_weight = None
        if weight is not None:  # W is trained and the loss is not linear in logp: recompute each chunk's softmax
            with torch.autocast(weight.device.type, enabled=False):
                w = weight.to(mm)
                d_weight = None
                for start in range(0, len(targets), ctx.chunk_size):
                    rows = slice(start, start + ctx.chunk_size)
                    h = hidden[rows].to(mm)
                    dz = _onehot_minus_softmax((h @ w.T).to(lse.dtype), lse[rows], targets[rows])
                    d_weight = _add_product(d_weight, (dz * grad_out[rows, None].to(lse.dtype)).T.to(mm), h, lse.dtype)
            if d_weight is None:
                d_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device)
            d_weight = d_weight.to(w_dtype)
        return d_hidden, d_weight, None, None, None, None


def _add_product(total: Tensor | None, a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """total + a @ b in `dtype`, accumulated in place where the product's dtype is `dtype`: a chunk's product is
    [vocab, hidden], and a fresh one per chunk costs as much in memory traffic as the product itself."""
    if total is None:
        return (a @ b).to(dtype)
    if a.dtype == dtype:
        return total.addmm_(a, b)
    return total.add_(a @ b)


def _onehot_minus_softmax(logits: Tensor, lse: Tensor, targets: Tensor) -> Tensor:
    dz = logits.sub_(lse[:, None]).exp_().neg_()
    return dz.scatter_add_(-1, targets[:, None], torch.ones_like(dz[:, :1]))
