"""What a TRL 1.16 user sets, its equivalent here, and whether the numbers are equal: the source of
docs/from-trl.md (`python -m tests.parity.table > docs/from-trl.md`). Every "equal" or "differs" row names the
parity cases that prove it (tests/parity/test_table.py checks they exist and that the document is current)."""

from __future__ import annotations

# (TRL trainer and field, lightning-align equivalent, verdict, parity cases "module::case")
ROWS = [
    (
        "SFTConfig",
        "loss_type='nll', completion_only_loss",
        "SFTModule (completion tokens only by default)",
        "equal (the token mean of a micro-batch; under accumulation every token of the step weighs the same, as "
        "TRL's num_items_in_batch)",
        ["sft_reward::sft loss equals trl"],
    ),
    ("RewardConfig", "(the pairwise loss), margin column", "RewardModule", "equal", ["sft_reward::reward loss"]),
    (
        "RewardConfig",
        "center_rewards_coefficient",
        "RewardModule(center_rewards_coefficient=)",
        "equal",
        ["sft_reward::reward loss"],
    ),
    ("DPOConfig", "beta, loss_type=['sigmoid']", "DPOModule(beta=, loss_type='sigmoid')", "equal", ["dpo::sigmoid"]),
    *[
        ("DPOConfig", f"loss_type=['{kind}']", f"DPOModule(loss_type='{kind}')", "equal", [f"dpo::{kind}"])
        for kind in ("hinge", "ipo", "nca_pair", "sppo_hard", "aot_unpaired", "apo_zero", "apo_down", "sigmoid_norm")
    ],
    ("DPOConfig", "loss_type=['robust'], label_smoothing", "the same names", "equal", ["dpo::robust"]),
    ("DPOConfig", "loss_type=['exo_pair'], label_smoothing", "the same names", "equal", ["dpo::exo_pair"]),
    ("DPOConfig", "loss_type=['aot'], label_smoothing", "the same names", "equal", ["dpo::aot"]),
    ("DPOConfig", "loss_type=['discopop'], discopop_tau", "the same names", "equal", ["dpo::discopop"]),
    (
        "DPOConfig",
        "loss_type=['bco_pair']",
        "DPOModule(loss_type='bco_pair', bco_running_mean=False)",
        "differs: by default we shift the implicit rewards by their running mean, as BCO's paper (TRL's shift is 0); "
        "`bco_running_mean=False` gives TRL's",
        ["dpo::bco_pair", "dpo::bco_pair running mean (BCO's delta; TRL's is 0)"],
    ),
    (
        "DPOConfig",
        "loss_type=['sigmoid'], label_smoothing > 0",
        "DPOModule(label_smoothing=0)",
        "differs: ours is conservative DPO (cDPO, Mitchell 2023); TRL 1.16 ignores label_smoothing for 'sigmoid'. "
        "Leave it 0 for TRL's numbers",
        ["dpo::sigmoid label_smoothing (cDPO; TRL ignores it)"],
    ),
    (
        "DPOConfig",
        "loss_type=[...], loss_weights (MPO)",
        "DPOModule(loss_type=[...], loss_weights=[...])",
        "equal; the 'sft' term is the token mean over the batch's chosen tokens (`nll_average='tokens'`); "
        "`nll_average='responses'` averages each response first (every pair weighs the same)",
        ["dpo::mpo", "dpo::sft term per response (nll_average; TRL's is the token mean)"],
    ),
    (
        "DPOConfig",
        "loss_type=['sigmoid', 'sft'], loss_weights=[1, alpha] (RPO)",
        "DPOModule(rpo_alpha=alpha)",
        "equal (TRL 1.16 has no rpo_alpha; this is its form)",
        ["dpo::rpo"],
    ),
    (
        "DPOConfig",
        "f_divergence_type, f_alpha_divergence_coef",
        "the same names",
        "equal for 'sigmoid', 'hinge', 'robust', 'exo_pair', 'discopop'; refused with 'ipo' and 'sigmoid_norm' (TRL "
        "transforms the summed log-ratios, then averages them: not f-DPO's definition)",
        ["dpo::forward_kl", "dpo::js_divergence", "dpo::alpha_divergence"],
    ),
    ("DPOConfig", "ld_alpha", "DPOModule(ld_alpha=)", "equal", ["dpo::ld_alpha"]),
    ("DPOConfig", "use_weighting (WPO)", "DPOModule(use_weighting=True)", "equal", ["dpo::wpo"]),
    (
        "DPOTrainer",
        "logged rewards/*, logps/*",
        "the same names",
        "equal (summed log-ratios and log-probs, also for 'ipo' and 'sigmoid_norm')",
        ["dpo::ipo", "dpo::sigmoid_norm"],
    ),
    ("KTOConfig", "beta, loss_type='kto'", "KTOModule(beta=)", "equal (the KL point from the same rows)", ["kto::kto"]),
    (
        "KTOConfig",
        "desirable_weight, undesirable_weight",
        "the same names",
        "equal; a class balance outside the paper's [1, 4/3] is warned about",
        ["kto::kto weighted"],
    ),
    ("KTOConfig", "loss_type='apo_zero_unpaired'", "KTOModule(loss_type=)", "equal", ["kto::apo_zero_unpaired"]),
    ("GRPOConfig", "loss_type='grpo'", "GRPOModule(loss_aggregation='grpo')", "equal", ["grpo::grpo"]),
    ("GRPOConfig", "loss_type='dr_grpo'", "GRPOModule(loss_aggregation='dr_grpo')", "equal", ["grpo::dr_grpo"]),
    (
        "GRPOConfig",
        "loss_type='dapo', epsilon_high",
        "GRPOModule(loss_aggregation='dapo', epsilon_high=)",
        "equal",
        ["grpo::dapo clip-higher beta"],
    ),
    ("GRPOConfig", "loss_type='bnpo'", "GRPOModule(loss_aggregation='bnpo')", "equal", ["grpo::bnpo"]),
    (
        "GRPOConfig",
        "loss_type='cispo', epsilon_high",
        "GRPOModule(policy_loss='cispo', loss_aggregation='dapo', epsilon_high=)",
        "equal",
        ["grpo::cispo"],
    ),
    (
        "GRPOConfig",
        "loss_type='sapo', sapo_temperature_pos / _neg",
        "GRPOModule(policy_loss='sapo', sapo_temperature_pos=, sapo_temperature_neg=)",
        "equal",
        ["grpo::sapo"],
    ),
    (
        "GRPOConfig",
        "importance_sampling_level='sequence' (GSPO)",
        "GRPOModule(importance_sampling_level='sequence')",
        "equal",
        ["grpo::gspo"],
    ),
    (
        "GRPOConfig",
        "beta, use_bias_correction_kl=True (default)",
        "GRPOModule(beta=, use_bias_correction_kl=True)",
        "differs by default: our k3 term is DeepSeekMath's, unweighted (TRL weighs it by the ratio, which changes "
        "its gradient even on-policy); `use_bias_correction_kl=True` gives TRL's",
        ["grpo::grpo beta", "grpo::grpo beta, plain k3", "grpo::default kl gradient"],
    ),
    (
        "RLOOTrainer",
        "RLOOConfig: beta, epsilon, normalize_advantages",
        "RLOOModule(beta=, epsilon=, normalize_advantages=)",
        "equal (sequence-level ratio, k1 KL in the reward); `GRPOModule(advantage='rloo')` is the token-level form",
        ["grpo::rloo"],
    ),
    (
        "GRPOConfig",
        "num_generations, scale_rewards, num_iterations, epsilon, mask_truncated_completions, reward_weights",
        "GRPOModule: the same names",
        "equal advantages (tested against TRL's formulas in tests/modules/test_grpo.py, not TRL's code: they sit "
        "inside its generation loop)",
        [],
    ),
    (
        "GRPOConfig",
        "multi_objective_aggregation",
        "GRPOModule(reward_aggregation=)",
        "equal, the same way (GDPO: 'normalize_then_sum' normalises the sum over the batch whatever scale_rewards)",
        [],
    ),
    (
        "ORPOConfig (experimental)",
        "beta (lambda)",
        "ORPOModule(orpo_lambda=, nll_on_prompt=True)",
        "differs by default: our NLL term is the token mean over the chosen completions' tokens (ORPO's paper, "
        "eq. 2); TRL's also counts the prompt's. `nll_on_prompt=True` gives TRL's. The odds-ratio term and its "
        "metrics (`log_odds_ratio`, `log_odds_chosen`, rewards) are TRL's",
        ["orpo::orpo with the prompt in its nll equals trl", "orpo::orpo default nll counts the completion only"],
    ),
]

# Settings that are not losses: (TRL, ours, note). Trainer and data module settings are YAML keys
# `trainer.<name>` and `data.init_args.<name>`.
GENERAL = [
    ("`model`, `model_init_kwargs`", "`SFTModule(model=...)` (`policy=` for PPO), `torch_dtype=`", ""),
    (
        "`learning_rate`, `weight_decay`, `adam_beta1/2`",
        "`learning_rate`, `weight_decay`, `betas`",
        "no weight decay on biases and norms",
    ),
    (
        '`lr_scheduler_type="linear"`, `warmup_steps`',
        "`warmup_steps`, then cosine to `learning_rate * min_lr_ratio`",
        "TRL decays linearly by default",
    ),
    (
        "`max_grad_norm=1.0`",
        "`L.Trainer(gradient_clip_val=1.0)` (every example config sets it); PPO: `max_grad_norm=1.0`",
        "Lightning does not clip unless asked",
    ),
    (
        "`per_device_train_batch_size`, `gradient_accumulation_steps`",
        "data module `batch_size`, `L.Trainer(accumulate_grad_batches=)`",
        "",
    ),
    (
        "`max_steps`, `num_train_epochs`, `bf16`, `gradient_checkpointing`",
        '`L.Trainer(max_steps=, max_epochs=, precision="bf16-mixed")`, `gradient_checkpointing=True`',
        "",
    ),
    (
        '`max_length`, `truncation_mode="keep_end"`',
        'data module `max_length`, `truncation="left"`',
        "we drop prompt tokens (keeping a quarter of `max_length`) and never cut a response: "
        "a row that still does not fit is dropped and counted",
    ),
    (
        "`packing`, `completion_only_loss`, `assistant_only_loss`",
        "`SFTDataModule(packing=True)`; completion / assistant tokens only by default "
        "(`train_on_prompt=True` scores all)",
        "",
    ),
    (
        "`precompute_ref_log_probs`, `ref_model`",
        "`precompute_ref_logps` (and `ref_cache_dir` to keep them on disk), `ref_model`",
        "",
    ),
    ("`disable_dropout=True`", "`disable_dropout=True`", "DPO, ORPO, reward model, PPO and GRPO"),
    (
        "`peft_config=LoraConfig(...)`",
        "`LoRA(r=, alpha=, dropout=, target_modules=)` callback, `QLoRA(...)` for 4-bit",
        "",
    ),
    (
        "shuffled training data",
        "`shuffle=True` (a seeded order per epoch, the same after a resume); `shuffle=False` keeps the file's order",
        "",
    ),
]

# Settings whose default differs (what a script that sets nothing gets).
DEFAULTS = [
    ("GRPOConfig.loss_type", "'dapo'", "GRPOModule(loss_aggregation='grpo')", "the GRPO paper's per-sequence mean"),
    ("GRPOConfig.use_bias_correction_kl", "True", "use_bias_correction_kl=False", "DeepSeekMath's k3"),
    ("DPOConfig.label_smoothing with 'sigmoid'", "ignored", "cDPO", "set 0 for TRL's"),
    ("DPOConfig bco_pair shift", "0", "running mean", "`bco_running_mean=False`"),
    ("lr_scheduler_type", "'linear' decay", "warmup, then cosine to learning_rate * min_lr_ratio", ""),
    ("max_grad_norm", "1.0", "Lightning clips only when asked", "`trainer.gradient_clip_val: 1.0` (every config)"),
    (
        "gradient_checkpointing",
        "True",
        "False",
        "`gradient_checkpointing=True` (TRL's kind), or `\"selective\"`: keeps the matrix products' and attention's "
        "outputs, reruns the element-wise work",
    ),
    ("RLOOConfig.num_generations / beta", "2 / 0.05", "RLOOModule: the same", ""),
    ("ORPOTrainer's NLL", "prompt and completion tokens", "completion tokens", "`nll_on_prompt=True`"),
]

HEADER = """# Coming from TRL

Generated by `python -m tests.parity.table` from the parity suite (`tests/parity/`), which runs TRL 1.16's own
trainers (their `_compute_loss` on their collators' batches, or on constructed rollouts) against ours on the same
token ids, policy and reference, and asserts equal losses (1e-5), gradients and logged metrics, or the documented
difference and that its switch removes it. A TRL release that changes a definition fails the suite.

Every module argument below is also a YAML key of `lightning-align fit --config`: `model.init_args.<argument>`
(trainer settings: `trainer.<name>`; data module settings: `data.init_args.<name>`).

| TRL | field | lightning-align | verdict | proven by |
|---|---|---|---|---|
"""


def markdown() -> str:
    lines = [HEADER.rstrip("\n")]
    for trainer, field, ours, verdict, cases in ROWS:
        lines.append(f"| {trainer} | `{field}` | `{ours}` | {verdict} | {', '.join(cases)} |")
    lines += ["", "## Settings that are not losses", "", "| TRL | lightning-align | note |", "|---|---|---|"]
    lines += [f"| {theirs} | {ours} | {note} |" for theirs, ours, note in GENERAL]
    lines += ["", "## Defaults that differ", "", "| TRL | TRL's default | ours | to get TRL's |", "|---|---|---|---|"]
    lines += [f"| {name} | {theirs} | {ours} | {switch} |" for name, theirs, ours, switch in DEFAULTS]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
