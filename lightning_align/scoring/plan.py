"""How a batch is scored, decided once per model in one place: packed without padding or padded, and where the
output layer runs. A fast path is taken only where it is proven equal to the model's own padded forward: by the
architecture grid of the tests for the families in it, and for every model by a check on the first batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_align.scoring.attention import attends_within_examples
from lightning_align.scoring.families import grid_model_types
from lightning_align.scoring.model import eval_mode, unwrapped

PACKINGS = ("one_row", "rows", "padded")  # all examples in one row (attention costs each its own) | in few rows | none
OUTPUT_LAYERS = ("chunked", "logits_to_keep", "full")
SCORING_CHECKS = ("fallback", "error", "off")
CHECKED_ROWS = 4  # rows of the first batch that the scoring check scores both ways

# Families whose attention is not causal attention over `position_ids`, so packed examples would see each other
# (what the grid measured on them packed).
PACKING_REFUSED = {
    "bloom": "its ALiBi biases are built from the attention mask and ignore position_ids",
    "mpt": "its ALiBi biases ignore position_ids",
}
# Families that pack into rows (Hugging Face's own masks) but not into one row with this library's kernel.
ONE_ROW_REFUSED = {
    "falcon": "its attention branches on the implementation's name and reads a renamed one's mask as numbers",
}
# Config settings that change the logits after the output layer, which the chunked output layer would skip.
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class ScoringPlan:
    packing: str = "padded"
    output_layer: str = "full"
    proven: bool = True  # the architecture grid covers this model's family; else only a check on real rows can

    @property
    def packed(self) -> bool:
        return self.packing != "padded"

    def __str__(self) -> str:
        return f"packing={self.packing}, output_layer={self.output_layer}"


SAFE_PLAN = ScoringPlan("padded", "full")


def fastest_plan(model: nn.Module, device: torch.device, sharded: bool = False, packing: bool = True) -> ScoringPlan:
    """The fastest scoring a causal LM or sequence classifier allows, by what its config and classes show."""
    base = unwrapped(model)
    config = base.config
    model_type = getattr(config, "model_type", None)
    if not packing or model_type in PACKING_REFUSED or getattr(config, "alibi", False):
        packed = "padded"
    else:
        one_row = attends_within_examples(model, device) and model_type not in ONE_ROW_REFUSED
        packed = "one_row" if one_row else "rows"
    if not sharded and output_weight(model) is not None:
        output_layer = "chunked"
    elif forward_takes_logits_to_keep(type(base)):
        output_layer = "logits_to_keep"
    else:
        output_layer = "full"
    return ScoringPlan(packed, output_layer, proven=model_type in grid_model_types())


def output_weight(model: nn.Module) -> torch.Tensor | None:
    """The output layer's weight of a causal LM whose logits are `last hidden state @ weight.T` and nothing more
    (a bias-free linear head, no scaling or soft-capping after it), or None."""
    base = unwrapped(model)
    config = getattr(base, "config", None)
    language_model = type(base).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    if not language_model or getattr(base, "base_model", base) is base:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_POSTPROCESSING):
        return None
    head = base.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return head.weight


@functools.cache
def forward_takes_logits_to_keep(model_class: type) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def fallbacks(plan: ScoringPlan) -> list[ScoringPlan]:
    """`plan`, then safer plans in order, ending with the model's own padded forward."""
    chain = [plan, replace(plan, packing="padded")]
    if plan.output_layer == "chunked":
        chain.append(ScoringPlan("padded", "logits_to_keep", plan.proven))
    chain.append(SAFE_PLAN)
    unique = []
    for candidate in chain:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def low_precision(model: nn.Module) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16, torch.uint8) for p in model.parameters())


def checked_plan(
    model: nn.Module,
    fast: ScoringPlan,
    score: Callable[[ScoringPlan], torch.Tensor],
    check: str,
    what: str,
    agree: Callable[[bool], bool] | None = None,
) -> ScoringPlan:
    """The first plan of `fallbacks(fast)` whose `score` of the same rows equals the model's own padded forward's
    (SAFE_PLAN), in eval mode and without autocast: per value within 1e-3 in float32 (paths differ by about
    1e-6 there), 5e-2 in lower precision. `check="error"` stops at the first difference instead. With several
    processes, `agree` tells whether a plan passed on every process's rows: all of them then take the same plan
    (and run the same forwards, as sharded weights require)."""
    tolerance = 5e-2 if low_precision(model) else 1e-3
    device_type = next(model.parameters()).device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False), eval_mode(model):
        expected = score(SAFE_PLAN).float()
        for plan in fallbacks(fast)[:-1]:
            try:
                difference = float((score(plan).float() - expected).abs().max())
                problem = None if difference <= tolerance else f"differs by up to {difference:.2e}"
            except Exception as err:  # noqa: BLE001 - any failure of a fast path means: not this one
                problem = f"failed ({type(err).__name__}: {err})"
            if agree is not None and not agree(problem is None):
                problem = problem or "differs on another process's rows"
            if problem is None:
                return plan
            message = f"scoring {what}: {plan} {problem} from the model's own padded forward"
            if check == "error":
                raise RuntimeError(f"{message}; set scoring_check='fallback' to use a safe path instead")
            rank_zero_warn(f"{message}; trying a safer path")
        return SAFE_PLAN


class Scoring:
    """The scoring plan of each network a module scores with, decided at the first batch it sees.

    `check`: "fallback" checks the fast plan on the first rows against the model's own padded forward and takes
    a safer plan where it differs; "error" stops instead; "off" trusts families the architecture grid proves
    and scores any other model on the safe path. With several processes the module sets `agree` (all processes
    passed?), so every process takes the same plan; sharded weights need it, since every process must run the
    same forwards, and without it the check is skipped there and unproven families take the safe path.
    """

    def __init__(self, check: str = "fallback"):
        if check not in SCORING_CHECKS:
            raise ValueError(f"unknown scoring_check {check!r}; valid: {', '.join(SCORING_CHECKS)}")
        self.check = check
        self.plans: dict[int, ScoringPlan] = {}
        self.checked: dict[int, bool] = {}  # whether each plan was checked on the first batch
        self.agree: Callable[[bool], bool] | None = None

    def plan(
        self,
        model: nn.Module,
        score: Callable[[ScoringPlan], torch.Tensor],
        device: torch.device,
        sharded: bool = False,
        packing: bool = True,
    ) -> ScoringPlan:
        key = id(unwrapped(model))
        if key not in self.plans:
            self.plans[key] = self.decide(model, score, device, sharded, packing)
            self.checked[key] = self.check != "off" and (not sharded or self.agree is not None)
        return self.plans[key]

    def decide(self, model, score, device, sharded, packing) -> ScoringPlan:
        fast = fastest_plan(model, device, sharded, packing)
        model_type = getattr(unwrapped(model).config, "model_type", "unknown")
        what = f"{model_type} ({type(unwrapped(model)).__name__})"
        if self.check == "off" or (sharded and self.agree is None):
            plan = fast if fast.proven else SAFE_PLAN
            how = "proven by the architecture grid" if fast.proven else "not in the architecture grid, unchecked"
        else:
            plan = checked_plan(model, fast, score, self.check, what, self.agree)
            how = ("proven by the architecture grid" if plan.proven else "not in the architecture grid") + (
                ", checked on the first batch"
            )
        why = "" if plan == fast else f" (instead of {fast})"
        if sharded and output_weight(model) is not None:  # the chunked product would need the output weight whole
            why += "; output layer not chunked: sharded, its weight is whole only inside the model's own forward"
        if packing and model_type in PACKING_REFUSED:
            why += f"; not packed: {PACKING_REFUSED[model_type]}"
        elif packing and model_type in ONE_ROW_REFUSED and plan.packing == "rows":
            why += f"; not in one row: {ONE_ROW_REFUSED[model_type]}"
        rank_zero_info(f"scoring {what}: {plan}{why}; {how}")
        return plan
