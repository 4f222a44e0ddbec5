"""The seed document's 7B resource table re-derived by the planner, written into docs/memory.md.

    python -m benchmarks.seed_table

Every row is `lightning_align.plan.plan_run` for Llama-2-7B's published configuration (tests/fixtures/llama-2-7b,
no weights) at micro-batch 1 and 512 tokens; the last row plans the seed's "QLoRA fine-tunes 65B on one GPU" with
LLaMA-65B's configuration.
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning_align.plan import GIB, RunSpec, plan_run

ROOT = Path(__file__).parent.parent
SEVEN = str(ROOT / "tests" / "fixtures" / "llama-2-7b")
SIXTY_FIVE = str(ROOT / "tests" / "fixtures" / "llama-65b")
COMMON = dict(micro_batch=1, max_length=512)
# (row, the seed's figure, our spec, why they differ)
ROWS = [
    (
        "Full fine-tuning (SFT)",
        "~28 GB",
        RunSpec(SEVEN, method="sft", precision="bf16-true", **COMMON),
        "the seed counts 4 bytes a parameter (the weights in float32, or weights + gradients in bf16); AdamW's two "
        "moments add 4 more bytes a parameter even in bf16",
    ),
    (
        "Full fine-tuning, mixed precision",
        "~28 GB",
        RunSpec(SEVEN, method="sft", precision="bf16-mixed", **COMMON),
        "bf16-mixed keeps float32 weights, gradients and moments: 16 bytes a parameter before any activation",
    ),
    (
        "LoRA r=16 (all linear layers)",
        "~16 GB",
        RunSpec(SEVEN, method="sft", adapter="lora", r=16, precision="bf16-true", **COMMON),
        "agrees: bf16 base (12.6 GiB) + activations; the seed's ~4M trainable parameters are r=8 on q and v only, "
        "all linear layers at r=16 train 40M",
    ),
    (
        "QLoRA r=16, gradient checkpointing",
        "~6 GB",
        RunSpec(SEVEN, method="sft", adapter="qlora", r=16, gradient_checkpointing=True, **COMMON),
        "agrees: NF4 body (3.1 GiB) + float32 embeddings, output layer and norms (1.0 GiB, as "
        "prepare_model_for_kbit_training leaves them) + checkpointed activations",
    ),
    (
        "DPO, full",
        "~28 GB",
        RunSpec(SEVEN, method="dpo", precision="bf16-true", **COMMON),
        "the seed leaves out the frozen reference copy (12.6 GiB) and AdamW's moments; chosen and rejected rows "
        "double the activations",
    ),
    (
        "DPO, full, precomputed reference log-probs",
        "~28 GB",
        RunSpec(SEVEN, method="dpo", precision="bf16-true", precompute_ref_logps=True, **COMMON),
        "the reference is released before training: full fine-tuning's memory with two rows a pair",
    ),
    (
        "DPO, LoRA r=16",
        "",
        RunSpec(SEVEN, method="dpo", adapter="lora", r=16, precision="bf16-true", **COMMON),
        "the reference is the adapter-disabled base: no second copy",
    ),
    (
        "Reward model, full",
        "",
        RunSpec(SEVEN, method="reward", precision="bf16-true", **COMMON),
        "full fine-tuning's memory with a score head for the output layer, two rows a pair",
    ),
    (
        "RLHF (PPO), full, 7B reward model",
        "~56 GB",
        RunSpec(SEVEN, method="ppo", precision="bf16-true", reward_model=SEVEN, max_new_tokens=256, **COMMON),
        "the seed counts two models; PPO holds the policy with its gradients and moments, a frozen reference copy "
        "and the reward model (the value head rides on the policy)",
    ),
    (
        "RLHF (PPO), LoRA r=16, 7B reward model",
        "",
        RunSpec(
            SEVEN,
            method="ppo",
            adapter="lora",
            r=16,
            precision="bf16-true",
            reward_model=SEVEN,
            max_new_tokens=256,
            **COMMON,
        ),
        "the reference is the adapter-disabled policy: base + reward model + activations",
    ),
    (
        "QLoRA r=16, LLaMA-65B, gradient checkpointing",
        "one GPU",
        RunSpec(SIXTY_FIVE, method="sft", adapter="qlora", r=16, gradient_checkpointing=True, **COMMON),
        "fits one 48 GB GPU, as the QLoRA paper reports; not a 24 GB one",
    ),
]


def main() -> None:
    lines = [
        "| run (Llama-2-7B unless named; micro-batch 1 x 512 tokens) | seed | planned peak per device | weights "
        "| gradients | AdamW | activations | other | trainable | why they differ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, seed, spec, why in ROWS:
        plan = plan_run(spec)
        parts = dict(plan.parts)
        weights, grads = parts.pop("weights"), parts.pop("gradients")
        adam = parts.pop("optimizer states (AdamW)")
        activations = parts.pop(next(k for k in parts if k.startswith("activations")))
        other = ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts.items()) or "-"
        lines.append(
            f"| {name} ({spec.precision}) | {seed} | **{plan.peak / GIB:.1f} GiB** | {weights / GIB:.1f} | "
            f"{grads / GIB:.1f} | {adam / GIB:.1f} | {activations / GIB:.1f} | {other} | "
            f"{plan.trainable_params / 1e6:,.0f}M | {why} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    path = ROOT / "docs" / "memory.md"
    text = path.read_text()
    text = re.sub(
        r"<!-- seed-table -->.*<!-- /seed-table -->",
        f"<!-- seed-table -->\n{table}\n<!-- /seed-table -->",
        text,
        flags=re.S,
    )
    path.write_text(text)


if __name__ == "__main__":
    main()
