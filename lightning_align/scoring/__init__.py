"""How a batch is scored, in one place: the plan (packed or padded, where the output layer runs), the families it
is proven on, and its execution (per-token log-probs of labelled rows or of sampled responses, last hidden
states, score heads). Modules call these; nothing outside this package knows about packing."""

from lightning_align.scoring.families import ARCHITECTURES, grid_model_types, tiny_config
from lightning_align.scoring.forward import causal_lm_logits, last_hidden_state, model_inputs
from lightning_align.scoring.model import body_of, eval_mode, unwrapped
from lightning_align.scoring.plan import (
    CHECKED_ROWS,
    SAFE_PLAN,
    Scoring,
    ScoringPlan,
    checked_plan,
    fastest_plan,
    output_weight,
)
from lightning_align.scoring.responses import packed_response_hidden, response_forward
from lightning_align.scoring.rows import (
    batch_scoring_plan,
    in_row_order,
    plan_token_logps,
    response_logps,
    scored_token_logps,
)
from lightning_align.scoring.scores import batch_rewards, body_and_score_head, score_head_values

__all__ = [
    "ARCHITECTURES",
    "CHECKED_ROWS",
    "SAFE_PLAN",
    "Scoring",
    "ScoringPlan",
    "batch_rewards",
    "batch_scoring_plan",
    "body_and_score_head",
    "body_of",
    "causal_lm_logits",
    "checked_plan",
    "eval_mode",
    "fastest_plan",
    "grid_model_types",
    "in_row_order",
    "last_hidden_state",
    "model_inputs",
    "output_weight",
    "packed_response_hidden",
    "plan_token_logps",
    "response_forward",
    "response_logps",
    "score_head_values",
    "scored_token_logps",
    "tiny_config",
    "unwrapped",
]
