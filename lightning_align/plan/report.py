"""The plan of a run, the cheapest change that makes it fit, and the `lightning-align plan` command."""

from __future__ import annotations

import argparse
import dataclasses
import time
from unittest import mock

import torch

from lightning_align.losses.tokens import CHUNK_LOGITS
from lightning_align.plan.formulas import (
    DDP_BUCKET_COPY,
    SHARDED,
    gib,
    model_bytes,
    text_config,
)
from lightning_align.plan.sharded import sharded_moment
from lightning_align.plan.spec import Plan, RunSpec, at_least, load_config, parse_bytes, spec_from_config
from lightning_align.plan.step import SHALLOW_DEPTHS, measure, weight_dtype
from lightning_align.scoring.plan import CHECKED_ROWS

DESCRIPTION = "Will it fit? The peak memory per device of a training run, planned before launch without any weights."


def output_layer_note(spec: RunSpec, config) -> str:
    """What the output layer holds on our path, against the full logits a plain forward would make."""
    vocab = text_config(config).vocab_size
    full = spec.rows * spec.sequence * vocab * 4
    if spec.strategy.startswith(("fsdp", "deepspeed")):
        return (
            f"output layer: logits of the scored positions only (logits_to_keep, as sharded weights require); "
            f"full float32 logits would be {gib(full)}"
        )
    chunk = max(1, CHUNK_LOGITS // vocab) * vocab * 4  # as losses.output_layer_logps
    return (
        f"output layer: chunked, {gib(chunk)} of logits at a time (counted in the activations); full "
        f"[{spec.rows} x {spec.sequence} x {vocab}] float32 logits would be {gib(full)}"
    )


def kv_cache_bytes(spec: RunSpec, config, dtype: torch.dtype) -> int:
    """Generation's cache: keys and values of every layer for every sampled row at full length."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    rows = spec.micro_batch * spec.num_generations
    element = torch.finfo(dtype).bits // 8
    return 2 * text.num_hidden_layers * heads * head_dim * rows * spec.sequence * element


def plan_run(spec: RunSpec) -> Plan:
    """The predicted peak memory per device of `spec`, by part."""
    started = time.perf_counter()
    config = load_config(spec.model)
    with mock.patch("transformers.modeling_utils.logger.warning_once"):
        measured, extrapolated = measure(spec, config)
    notes = []
    if extrapolated:
        notes.append(
            f"measured at {', '.join(map(str, SHALLOW_DEPTHS))} layers: each layer added the same, so the full "
            "depth is the shallowest plus that per layer"
        )
    moment = max(("peak", "forward_end", "first_batch_check"), key=lambda m: measured.get(f"{m}:total", 0))
    peak = {key: measured.get(f"{moment}:{key}", 0) for key in ("params", "grads", "optimizer", "activations")}
    if moment == "first_batch_check":
        notes.append(
            f"the peak is the first batch's check of the fast scoring path ({CHECKED_ROWS} rows through the model's "
            "own forward, full float32 logits); scoring_check='off' skips it"
        )
    peak["activations"] += measured["dequantised"]
    weights = {key.removeprefix("dtype:"): n for key, n in measured.items() if key.startswith("dtype:") and n}
    params = peak["params"]
    if measured["quantised"]:
        params += measured["nf4"] - measured["quantised"]
        weights[spec.compute_dtype] = weights.get(spec.compute_dtype, 0) - measured["quantised"]
        weights = {dtype: n for dtype, n in weights.items() if n}
        weights["nf4" + (" (double quant)" if spec.double_quant else "")] = measured["nf4"]
        notes.append(
            "QLoRA: the body's linear weights as bitsandbytes stores them (NF4, 64-weight blocks), the rest "
            "float32 as prepare_model_for_kbit_training leaves it; activations include one dequantised weight"
        )
    parts = {
        "weights": params,
        "gradients": peak["grads"],
        "optimizer states (AdamW)": peak["optimizer"],
        "activations" + (" (checkpointed)" if spec.gradient_checkpointing else ""): peak["activations"],
    }
    if spec.method != "reward":
        notes.append(output_layer_note(spec, config))
    divide = SHARDED.get(spec.strategy.split("_offload")[0], ()) if spec.devices > 1 else ()
    for part, key in (("weights", "params"), ("gradients", "grads"), ("optimizer states (AdamW)", "optimizer")):
        if key in divide:
            parts[part] //= spec.devices
    if divide:
        notes.append(f"{spec.strategy}: {', '.join(divide)} divided over {spec.devices} devices")
    if "params" in divide and spec.strategy == "fsdp" and measured["quantised"]:  # 4-bit weights stay whole
        parts["weights"] += measured["nf4"] - measured["nf4"] // spec.devices
        notes.append("fsdp: QLoRA's 4-bit weights are whole on every process (the rest is sharded)")
    if spec.strategy.startswith("ddp") and spec.devices > 1:
        parts["DDP gradient buckets"] = int(peak["grads"] * DDP_BUCKET_COPY)
    sharded = spec.strategy == "fsdp" and spec.devices > 1
    generation = 0
    frozen_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(spec.precision, torch.float32)
    if spec.method in ("dpo", "kto", "ppo", "grpo") and spec.uses_reference and not spec.adapter:
        if spec.precompute_ref_logps:
            notes.append("reference log-probs precomputed: the reference is released before training")
        else:
            parts["reference model (frozen copy)"] = model_bytes(config, weight_dtype(spec))
    if spec.method == "ppo" and spec.critic:
        critic = model_bytes(load_config(spec.critic), weight_dtype(dataclasses.replace(spec, adapter=None)), True)
        parts["critic (weights, gradients, AdamW)"] = 4 * critic  # weights + gradients + two AdamW moments
    if "params" in divide:  # the frozen copy and the critic are sharded like the policy
        for part in ("reference model (frozen copy)", "critic (weights, gradients, AdamW)"):
            if part in parts:
                parts[part] //= spec.devices
    if spec.method in ("ppo", "grpo"):
        if spec.reward_model:
            parts["reward model"] = model_bytes(load_config(spec.reward_model), frozen_dtype, scorer=True)
        generation = kv_cache_bytes(spec, config, torch.bfloat16 if spec.precision.startswith("bf16") else frozen_dtype)
        notes.append(
            f"generation's KV cache ({gib(generation)}) is held while sampling, when no activations are: "
            "the larger of the two counts"
        )
        if not sharded:
            key = next(k for k in parts if k.startswith("activations"))
            parts[key] = max(parts[key], generation)
    if sharded:
        sharded_moment(spec, config, parts, measured["trainable"], generation, notes)
    plan = Plan(
        spec,
        parts,
        notes,
        weights,
        measured["trainable"],
        measured["total"],
    )
    if sharded:
        # Each process loads the whole model (and copies a full-weight reference) before sharding them: host memory.
        whole = model_bytes(config, weight_dtype(dataclasses.replace(spec, adapter=None)))
        copies = 2 if "reference model (frozen copy)" in parts else 1
        plan.setup = copies * (whole + whole // spec.devices)
        notes.append(
            f"fsdp: at set-up each process holds {copies} whole model(s) in host memory while sharding "
            f"({gib(plan.setup)}), before the device peak above"
        )
    plan.seconds = time.perf_counter() - started
    return plan


# ----- the cheapest change that fits ---------------------------------------------------------------------------
def changes(spec: RunSpec) -> list[tuple[str, RunSpec]]:
    """Changes to try, cheapest first: those that keep the result the same before those that change it."""
    out = []
    if spec.checkpointing is None:
        out.append(
            (
                "selective gradient checkpointing (same result, up to ~10% slower)",
                dataclasses.replace(spec, gradient_checkpointing="selective"),
            )
        )
    if spec.checkpointing != "full":
        out.append(
            (
                "gradient checkpointing (same result, ~30% slower)",
                dataclasses.replace(spec, gradient_checkpointing=True),
            )
        )
    if spec.micro_batch > 1:
        half = spec.micro_batch // 2
        out.append(
            (
                f"micro-batch {half} with accumulate_grad_batches doubled (same result)",
                dataclasses.replace(spec, micro_batch=half),
            )
        )
    # Precomputed reference log-probs are refused under sharding (see modules/sharding.check_mesh).
    if spec.reference_forward and not spec.adapter and spec.method in ("dpo", "kto") and spec.strategy != "fsdp":
        out.append(("precompute_ref_logps=True (same result)", dataclasses.replace(spec, precompute_ref_logps=True)))
    if spec.adapter is None:
        out.append(("the LoRA callback (r=16)", dataclasses.replace(spec, adapter="lora", r=16)))
    if spec.adapter != "qlora":
        out.append(("the QLoRA callback (r=16)", dataclasses.replace(spec, adapter="qlora", r=16)))
    if spec.devices == 1 or spec.strategy not in ("fsdp", "deepspeed_stage_3"):
        out.append(("FSDP over 2 more devices", dataclasses.replace(spec, strategy="fsdp", devices=spec.devices + 2)))
    return out


def cheapest_fit(spec: RunSpec, device_memory: int) -> tuple[str, Plan] | None:
    for what, changed in changes(spec):
        plan = plan_run(changed)
        if plan.fits(device_memory):
            return what, plan
    return None


def local_device_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-align plan", description=DESCRIPTION)
    parser.add_argument("--config", required=True, help="the config `lightning-align fit` would run")
    parser.add_argument("--model", help="another model: a folder with config.json, or the file (no weights needed)")
    parser.add_argument("--device-memory", help="the device's memory, e.g. 24GiB (default: the local GPU's)")
    parser.add_argument("--micro-batch", type=at_least(1))
    parser.add_argument("--max-length", type=at_least(2))
    parser.add_argument("--precision")
    parser.add_argument("--strategy")
    parser.add_argument("--devices", type=at_least(1))
    parser.add_argument(
        "--gradient-checkpointing",
        nargs="?",
        const="full",
        choices=["full", "selective"],
        default=None,
        help="plan with activation checkpointing: full (the default when given alone) or selective",
    )
    args = parser.parse_args(argv)
    memory = parse_bytes(args.device_memory) if args.device_memory else local_device_memory()
    spec = spec_from_config(
        args.config,
        model=args.model,
        micro_batch=args.micro_batch,
        max_length=args.max_length,
        precision=args.precision,
        strategy=args.strategy,
        devices=args.devices,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    plan = plan_run(spec)
    print(plan.table())
    if memory is None:
        print(f"planned in {plan.seconds:.1f} s; give --device-memory to check a device")
        return
    if plan.fits(memory):
        print(
            f"fits a {gib(memory)} device ({gib(memory - plan.device_total())} to spare); "
            f"planned in {plan.seconds:.1f} s"
        )
        return
    print(f"does NOT fit a {gib(memory)} device (needs {gib(plan.device_total())})")
    found = cheapest_fit(spec, memory)
    if found is None:
        print("no single change on the list (checkpointing, smaller micro-batch, LoRA, QLoRA, FSDP) makes it fit")
    else:
        what, fitting = found
        print(f"cheapest change that fits: {what} -> {gib(fitting.device_total())}")
