"""Training-step benchmark: lightning-align against TRL on the same model, rows, batch and precision, in one run.

    python -m benchmarks.compare --method dpo --peft lora      # one comparison; its row in RESULTS.md is replaced
    python -m benchmarks.compare --all                          # every comparison, written to RESULTS.md
    python -m benchmarks.compare --all --shape gqa              # the same on a grouped-query, wider, deeper model
    python -m benchmarks.compare --levers                       # our step without each lever, into RESULTS.md
    python -m benchmarks.compare --objectives                   # KTO and ORPO against TRL's trainers

Needs the `bench` extra (`pip install -e .[bench]`, which adds TRL). Each framework runs in a process of its own,
so its peak resident memory is its own. Model: a Llama-shaped model built from a config (32,000-token vocabulary;
shape "llama": hidden 256, 4 layers, 4 heads; shape "gqa": hidden 384, 6 layers, 6 query and 2 key/value heads,
longer prompts), random init with a fixed seed, fp32 on CPU. Data: synthetic rows whose prompt
and response lengths follow a skewed distribution (prompts 20-300 tokens, responses 10-400), written as text
for a word-level tokenizer whose every word is one token, so both frameworks see exactly the same tokens. Every
row fits the maximum length, so neither framework truncates or drops any.

Figures: the median over the timed steps (after warm-up steps) of real (non-padding) training tokens per second,
counted from the batches each framework fed its steps; peak resident memory; and model FLOPs utilisation =
achieved model FLOP/s over the fp32 matmul peak measured at start.
Model FLOPs of a step: 6 N_body T + 6 N_head S for a training pass (forward + backward; 4 instead of 6 under LoRA,
whose frozen weights need no weight gradient) and 2 N_body T + 2 N_head S for each extra forward (the DPO
reference), with T the real tokens, S the scored tokens (where a loss needs the output layer: response tokens for
SFT and DPO, none for the reward model, whose head is a scalar), N_body the parameters of the transformer blocks and
N_head those of the output layer (embeddings are lookups). Work beyond this (logits of prompt positions, padding)
is not model work and does not count. Attention's score and value
products are left out too, so the figure understates the arithmetic done rather than overstating it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).parent
# Model and data shapes. "llama": the first benchmark's shape. "gqa": closer to current models, with grouped-query
# attention, wider and deeper, and longer rows (so fewer rows per step and fewer steps, to keep the run short).
SHAPES = {
    "llama": dict(heads=4, kv_heads=4, hidden=256, layers=4, batch=8, max_length=512, prompts=(4.3, 20, 300)),
    "gqa": dict(heads=6, kv_heads=2, hidden=384, layers=6, batch=4, max_length=1024, prompts=(5.3, 50, 700)),
}
SHAPE = "llama"
VOCAB, ROWS = 32_000, 96
HIDDEN, LAYERS, HEADS, KV_HEADS, BATCH, MAX_LENGTH = 256, 4, 4, 4, 8, 512
WARMUP_STEPS, TIMED_STEPS = 2, 8
DEVICE = os.environ.get("BENCH_DEVICE", "cpu")  # "cuda": both frameworks on the GPU, bf16 (benchmarks.gpu_check)


def use_shape(name: str) -> None:
    global SHAPE, HIDDEN, LAYERS, HEADS, KV_HEADS, BATCH, MAX_LENGTH, WARMUP_STEPS, TIMED_STEPS
    shape = SHAPES[name]
    SHAPE = name
    HIDDEN, LAYERS, HEADS, KV_HEADS = shape["hidden"], shape["layers"], shape["heads"], shape["kv_heads"]
    BATCH, MAX_LENGTH = shape["batch"], shape["max_length"]
    WARMUP_STEPS, TIMED_STEPS = (2, 8) if name == "llama" else (1, 4)


def body_parameters() -> int:
    """Parameters of the transformer blocks' matrices: attention (grouped-query: smaller k and v) and the MLP."""
    kv = HIDDEN * KV_HEADS // HEADS
    return LAYERS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * 4 * HIDDEN)


COMBINATIONS = [
    ("sft", "none"),
    ("sft", "lora"),
    ("reward", "none"),
    ("reward", "lora"),
    ("dpo", "none"),
    ("dpo", "lora"),
]
# TRL checkpoints activations by default (SFT, DPO, reward): each method is also compared with ours checkpointing too.
BOTH_CHECKPOINTING = [("sft", "none"), ("reward", "none"), ("reward", "lora"), ("dpo", "none")]
# The goals against TRL (speed at least, memory at most), printed beside each row.
GOALS = {"sft": (5.0, 0.35), "dpo": (5.0, 0.35), "reward": (2.0, 0.9)}
# The preference objectives beyond DPO, against TRL's KTOTrainer and its experimental ORPOTrainer.
OBJECTIVES = [("kto", "none"), ("kto", "lora"), ("orpo", "none"), ("orpo", "lora")]


# ----- the shared fixture ----------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A tokenizer whose every word is one token (`t4` ... `t<vocab_size - 1>`), so all frameworks see the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"t{i}" for i in range(len(specials), vocab_size)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def build_fixture(folder: Path) -> Path:
    """Model, tokenizer and rows in `folder` (built once)."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (folder / "rows.jsonl").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer(VOCAB).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    rng = random.Random(0)

    def words(low: int, high: int, mu: float = 4.3) -> str:
        n = min(high, max(low, int(rng.lognormvariate(mu, 0.7))))  # skewed: most short, a long tail
        return " ".join(f"t{rng.randrange(4, VOCAB)}" for _ in range(n))

    mu, low, high = SHAPES[SHAPE]["prompts"]
    with open(folder / "rows.jsonl", "w") as f:
        for _ in range(ROWS):
            prompt, chosen, rejected = words(low, high, mu), words(10, 400), words(10, 400)
            # Every row fits MAX_LENGTH (with BOS and EOS): TRL's reward trainer drops longer rows and its DPO
            # trainer cuts their ends where we cut the prompt's start, so only rows that fit are the same rows.
            room = MAX_LENGTH - 2 - max(len(chosen.split()), len(rejected.split()))
            prompt = " ".join(prompt.split()[-room:])
            f.write(json.dumps({"prompt": prompt, "completion": chosen, "chosen": chosen, "rejected": rejected}))
            f.write("\n")
    return folder


def kto_rows(folder: Path) -> Path:
    """The fixture's pairs as unpaired feedback: each pair gives a desirable and an undesirable row."""
    path = folder / "kto_rows.jsonl"
    if not path.exists():
        with open(folder / "rows.jsonl") as rows, open(path, "w") as f:
            for line in rows:
                row = json.loads(line)
                for answer, label in ((row["chosen"], True), (row["rejected"], False)):
                    f.write(json.dumps({"prompt": row["prompt"], "completion": answer, "label": label}) + "\n")
    return path


def batch_tokens(batch: dict, scored_key: str | None) -> tuple[int, int]:
    """(real, scored) tokens of one batch as a framework fed it: non-padding tokens, and the positions its loss
    scores (labels other than -100, or a completion mask), summed over the batch's groups of rows (TRL's KTO
    batches carry the mismatched rows under `KL_`, its ORPO batches the answers under `chosen_` / `rejected_`)."""
    real = scored = 0
    for prefix in ("", "KL_") if "input_ids" in batch else ("chosen_", "rejected_"):
        if prefix + "input_ids" not in batch:
            continue
        mask = batch.get(prefix + "attention_mask")
        real += int(mask.sum()) if mask is not None else batch[prefix + "input_ids"].numel()
        if scored_key is not None:
            marks = batch[prefix + scored_key]
            scored += int((marks != -100).sum() if scored_key == "labels" else marks.sum())
    return real, scored


def matmul_peak_flops(seconds: float = 2.0, n: int = 2048) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        done += 1
    return 2 * n**3 * done / (time.perf_counter() - started)


# ----- one framework, one method, in this process ----------------------------------------------------------------
class StepClock:
    """Step boundaries, and the tokens of each batch in the order the framework drew them."""

    def __init__(self, scored_key: str | None):
        self.marks: list[float] = []
        self.batches: list[tuple[int, int]] = []
        self.scored_key = scored_key

    def tick(self) -> None:
        self.marks.append(time.perf_counter())

    def saw(self, batch: dict) -> dict:
        self.batches.append(batch_tokens(batch, self.scored_key))
        return batch

    def timed_steps(self) -> list[tuple[float, int, int]]:
        """(seconds, real tokens, scored tokens) of each timed step."""
        steps = range(WARMUP_STEPS, WARMUP_STEPS + TIMED_STEPS)
        return [(self.marks[i + 1] - self.marks[i], *self.batches[i]) for i in steps]


def run_ours(
    folder: Path, method: str, peft: str, variant: str = "", callbacks: list = ()
) -> list[tuple[float, int, int]]:
    import lightning as L

    import lightning_align as la

    L.seed_everything(0)
    model, rows = str(folder), str(folder / "rows.jsonl")
    settings = apply_variant(variant, method)
    if method == "sft":
        packing = settings.pop("padding_free", True)
        data = la.SFTDataModule(model, rows, batch_size=BATCH, max_length=MAX_LENGTH, packing=packing)
        module = la.SFTModule(model, learning_rate=1e-5, **settings)
    elif method == "kto":
        data = la.UnpairedPreferenceDataModule(model, str(kto_rows(folder)), batch_size=BATCH, max_length=MAX_LENGTH)
        module = la.KTOModule(model, learning_rate=1e-6, **settings)
    elif method == "orpo":
        data = la.PreferenceDataModule(model, rows, batch_size=BATCH, max_length=MAX_LENGTH)
        module = la.ORPOModule(model, learning_rate=1e-6, **settings)
    else:
        data = la.PreferenceDataModule(model, rows, batch_size=BATCH, max_length=MAX_LENGTH)
        module = (
            la.RewardModule(model, learning_rate=1e-5, **settings)
            if method == "reward"
            else la.DPOModule(model, learning_rate=1e-6, **settings)
        )
    clock = StepClock(None if method == "reward" else "labels")

    class Tick(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if not clock.marks:
                clock.tick()
            clock.saw(batch)

        def on_train_batch_end(self, *args):
            clock.tick()

    callbacks = [Tick(), *callbacks] + ([la.LoRA(r=16, alpha=32)] if peft == "lora" else [])
    trainer = L.Trainer(
        accelerator=DEVICE,
        precision="bf16-mixed" if DEVICE == "cuda" else "32-true",
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=tempfile.mkdtemp(dir=folder, prefix="ours-out-"),  # a fresh folder for the LoRA adapter
    )
    trainer.fit(module, datamodule=data)
    return clock.timed_steps()


def run_trl(folder: Path, method: str, peft: str, variant: str = "") -> list[tuple[float, int, int]]:
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    rows = datasets.load_dataset("json", data_files=str(folder / "rows.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scored_key = {"sft": "labels", "reward": None, "dpo": "completion_mask", "kto": "completion_mask"}
    clock = StepClock(scored_key.get(method, "labels"))

    class Tick(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            if not clock.marks:
                clock.tick()

        def on_step_end(self, *args, **kwargs):
            clock.tick()

    common = dict(
        output_dir=str(folder / "trl-out"),
        per_device_train_batch_size=BATCH,
        max_steps=WARMUP_STEPS + TIMED_STEPS,
        max_length=MAX_LENGTH,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        use_cpu=DEVICE == "cpu",
        bf16=DEVICE == "cuda",
        learning_rate=1e-5,
        seed=0,
    )
    peft_config = None
    if peft == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if method == "sft":
        model = AutoModelForCausalLM.from_pretrained(folder)
        data = rows.select_columns(["prompt", "completion"])
        trainer = trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**common),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    elif method == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        data = rows.map(
            lambda r: {"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]}
        )
        trainer = trl.RewardTrainer(
            model=model,
            args=trl.RewardConfig(**common),
            train_dataset=data.select_columns(["chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    elif method == "kto":
        model = AutoModelForCausalLM.from_pretrained(folder)
        trainer = trl.KTOTrainer(
            model=model,
            args=trl.KTOConfig(**common),
            train_dataset=datasets.load_dataset("json", data_files=str(kto_rows(folder)), split="train"),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        model = AutoModelForCausalLM.from_pretrained(folder)
        trainer = ORPOTrainer(
            model=model,
            args=ORPOConfig(**common),
            train_dataset=rows.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
        trainer = trl.DPOTrainer(
            model=model,
            args=trl.DPOConfig(**common),
            train_dataset=rows.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Tick()],
        )
    collate = trainer.data_collator  # batches are collated in the order the steps use them
    trainer.data_collator = lambda examples: clock.saw(collate(examples))
    trainer.train()
    return clock.timed_steps()


def fixture_folder() -> Path:
    return ROOT / (".fixture" if SHAPE == "llama" else f".fixture-{SHAPE}")


def step_model_flops(method: str, peft: str, steps: list[tuple[float, int, int]]) -> float:
    """Model FLOPs of `steps` (seconds, real tokens, scored tokens), counted as the module docstring says."""
    body, head = body_parameters(), VOCAB * HIDDEN
    # Forward 2, input gradient 2, weight gradient 2 -- frozen LoRA base weights skip the last.
    passes = (4 if peft == "lora" else 6) + (2 if method == "dpo" else 0)  # DPO: the reference's forward
    if method == "kto":  # half the rows trained, the mismatched half forward only, the reference over all rows
        passes = (2 if peft == "lora" else 3) + 1 + 2
    return sum(passes * (body * real + head * scored) for _, real, scored in steps)


def child(framework: str, method: str, peft: str, variant: str = "") -> dict:
    import statistics

    import torch

    torch.set_num_threads(2)
    folder = build_fixture(fixture_folder())
    # Each framework draws the rows in an order of its own: count the tokens each timed step was fed.
    steps = (run_ours if framework == "ours" else run_trl)(folder, method, peft, variant)
    return {
        "tokens_per_sec": statistics.median(real / seconds for seconds, real, _ in steps),
        "model_flops_per_sec": statistics.median(step_model_flops(method, peft, [step]) / step[0] for step in steps),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----- levers: our step with one of them switched off, or an option switched on -----------------------------------
LEVERS = {
    "padding_free": "rows packed without padding (SFT: packing; reward, DPO: `padding_free`)",
    "response_positions_only": "output layer at scored positions only (else full [batch, seq, vocab] logits)",
    "chunked_output_layer": "output layer + log-softmax a chunk of positions at a time (else `logits_to_keep`)",
    "within_example_attention": "attention inside each packed example (else sdpa under the block mask)",
    "fused_adamw": "fused AdamW step (else the foreach implementation)",
}
DPO_LEVERS = {
    "concatenated_forward": "DPO: chosen and rejected rows in one forward (else one forward for each)",
    "no_grad_reference": "DPO: the reference's forward under no-grad (else with autograd on)",
}
OPTIONS = {
    "gradient_checkpointing": "activation checkpointing (`gradient_checkpointing=True`)",
    "precomputed_reference": "reference log-probs precomputed before training (`precompute_ref_logps=True`)",
    "compile": "each decoder layer compiled (`torch.compile`, dynamic shapes)",
}
LEVER_RUNS = [  # (method, adapter, variants)
    ("sft", "none", list(LEVERS) + ["+gradient_checkpointing", "+compile"]),
    ("reward", "none", ["padding_free", "within_example_attention", "fused_adamw"]),
    ("dpo", "none", list(LEVERS) + list(DPO_LEVERS) + ["+precomputed_reference"]),
    ("dpo", "lora", ["padding_free", "response_positions_only", "chunked_output_layer", "+gradient_checkpointing"]),
]


def apply_variant(variant: str, method: str) -> dict:
    """Switch one lever off ("name") or one option on ("+name") in this process; returns module settings."""
    import contextlib
    import dataclasses

    import torch

    from lightning_align.modules import base, dpo, reference
    from lightning_align.scoring import plan as scoring

    if variant == "padding_free":
        return {"padding_free": False}
    if variant == "+gradient_checkpointing":
        return {"gradient_checkpointing": True}
    if variant == "+selective_checkpointing":
        return {"gradient_checkpointing": "selective"}
    if variant == "+precomputed_reference":
        return {"precompute_ref_logps": True}
    if variant == "+compile":
        configure_model = base.AlignModule.configure_model

        def with_compiled_layers(self):
            configure_model(self)
            model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            for layer in model.model.layers:
                layer.compile(dynamic=True)

        base.AlignModule.configure_model = with_compiled_layers
        return {}
    if variant in ("chunked_output_layer", "response_positions_only", "within_example_attention"):
        fastest_plan = scoring.fastest_plan

        def without_lever(*args, **kwargs):
            plan = fastest_plan(*args, **kwargs)
            if variant == "within_example_attention":  # packed into rows as long as the longest example instead
                return dataclasses.replace(plan, packing="rows") if plan.packing == "one_row" else plan
            return dataclasses.replace(plan, output_layer="logits_to_keep" if variant[0] == "c" else "full")

        scoring.fastest_plan = without_lever
    elif variant == "fused_adamw":

        class UnfusedAdamW(torch.optim.AdamW):
            def __init__(self, *args, fused=None, **kwargs):
                super().__init__(*args, **kwargs)

        torch.optim.AdamW = UnfusedAdamW
    elif variant == "concatenated_forward":
        one_forward = dpo.response_logps

        def forward_per_half(model, batch, *args, **kwargs):
            keys = ("input_ids", "attention_mask", "labels")
            halves = zip(*(batch[key].chunk(2) for key in keys))
            return torch.cat([one_forward(model, dict(zip(keys, half)), *args, **kwargs) for half in halves])

        dpo.response_logps = forward_per_half
    elif variant == "no_grad_reference":
        no_grad_call = reference.Reference.__call__

        @contextlib.contextmanager
        def with_autograd(self, policy):
            with no_grad_call(self, policy) as network, torch.enable_grad():
                yield network

        reference.Reference.__call__ = with_autograd
    elif variant:
        raise ValueError(f"unknown variant {variant!r}")
    return {}


def run_child(framework: str, method: str, peft: str, variant: str = "") -> dict:
    command = [sys.executable, "-m", "benchmarks.compare", "--child", framework, "--method", method, "--peft", peft]
    command += ["--shape", SHAPE]
    done = subprocess.run(command + (["--variant", variant] if variant else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} {method} {peft} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_runs(runs: list[tuple[str, str, str, str]], repeats: int) -> dict[tuple, dict]:
    """Each run (framework, method, adapter, variant) `repeats` times, in rounds over all of them, keeping the
    fastest of each: a slow spell of the shared machine then costs one run, not one side of a comparison."""
    best: dict[tuple, dict] = {}
    for round_ in range(repeats):
        for run in runs:
            r = run_child(*run)
            if run not in best or r["tokens_per_sec"] > best[run]["tokens_per_sec"]:
                best[run] = r
            print(
                f"round {round_ + 1}/{repeats} {' '.join(filter(None, run))}: {r['tokens_per_sec']:.0f} tokens/s",
                flush=True,
            )
    return best


def levers(peak: float, repeats: int) -> str:
    """Our step with all levers on, then with each lever off (or an option on): the effect of each, measured."""
    lines = [
        "| method | adapter | run | tokens/s | speed with / without | peak MiB | memory with / without | MFU |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    runs = [("ours", method, peft, variant) for method, peft, variants in LEVER_RUNS for variant in [""] + variants]
    results = best_runs(runs, repeats)
    for method, peft, variants in LEVER_RUNS:
        full = results["ours", method, peft, ""]
        lines.append(
            f"| {method} | {peft} | all levers on | {full['tokens_per_sec']:.0f} | | {full['peak_mib']:.0f} | | "
            f"{100 * full['model_flops_per_sec'] / peak:.1f}% |"
        )
        print(lines[-1], flush=True)
        for variant in variants:
            r = results["ours", method, peft, variant]
            option = variant.startswith("+")  # an option switched on, else a lever switched off
            on, off = (r, full) if option else (full, r)
            lines.append(
                f"| {method} | {peft} | {'with ' + variant[1:] if option else 'without ' + variant} | "
                f"{r['tokens_per_sec']:.0f} | {on['tokens_per_sec'] / off['tokens_per_sec']:.2f}x | "
                f"{r['peak_mib']:.0f} | {on['peak_mib'] / off['peak_mib']:.2f} | "
                f"{100 * r['model_flops_per_sec'] / peak:.1f}% |"
            )
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ----- the comparison --------------------------------------------------------------------------------------------
def compare(method: str, peft: str, peak: float, runs: dict[tuple, dict], variant: str = "") -> dict:
    ours, theirs = runs["ours", method, peft, variant], runs["trl", method, peft, ""]
    for r in (ours, theirs):
        r["mfu"] = r["model_flops_per_sec"] / peak
    return {
        "method": method,
        "peft": peft + (" (both checkpointing)" if variant == "+gradient_checkpointing" else ""),
        "ours": ours,
        "trl": theirs,
        "speed_ratio": ours["tokens_per_sec"] / theirs["tokens_per_sec"],
        "memory_ratio": ours["peak_mib"] / theirs["peak_mib"],
    }


def machine_line(peak: float, command: str, repeats: int) -> str:
    import lightning
    import torch
    import transformers

    try:
        import trl

        peer = f", trl {trl.__version__}"
    except ImportError:
        peer = ""
    return (
        f"Measured by `python -m benchmarks.compare {command}` on {date.today()}: {platform.machine()}, "
        f"{platform.processor() or 'CPU'}, 2 threads, fp32; torch {torch.__version__}, "
        f"lightning {lightning.__version__}, transformers {transformers.__version__}{peer}. "
        f"Matmul peak {peak / 1e9:.1f} GFLOP/s.\n"
        f"Model ({SHAPE} shape): Llama-shaped, vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads "
        f"({KV_HEADS} key/value heads); batch {BATCH}, "
        f"max length {MAX_LENGTH}; {WARMUP_STEPS} warm-up steps, then medians over {TIMED_STEPS} timed steps of "
        f"tokens/s (real tokens, not padding) and model FLOP/s; each run {repeats} times, in rounds over all "
        "runs, the fastest kept (a slow spell of the shared machine only ever slows a run).\n"
        "MFU = model FLOP/s / matmul peak; model FLOPs of a step = (6, or 4 under LoRA's frozen weights, "
        "+ 2 for DPO's reference forward; KTO: 3, or 2 under LoRA, for the half of its rows that trains, + 1 "
        "for the mismatched half's no-grad forward, + 2 for the reference over both; ORPO: no reference) x "
        f"(N_body x real tokens + N_head x scored tokens), N_body = {body_parameters():,} (the blocks' "
        f"matrices), N_head = {VOCAB * HIDDEN:,} (output layer; no scored tokens for the reward model). Peak "
        "memory: the process's maximum resident set."
    )


def goal_text(row: dict) -> str:
    if row["method"] not in GOALS:
        return ""
    speed, memory = GOALS[row["method"]]
    met = row["speed_ratio"] >= speed and row["memory_ratio"] <= memory
    return f">={speed:g}x, <={memory:g}: {'met' if met else 'not met'}"


def table(rows: list[dict], peak: float, repeats: int, command: str) -> str:
    lines = [
        machine_line(peak, command, repeats),
        "",
        "| method | adapter | ours tokens/s | TRL tokens/s | speed ratio | ours peak MiB | TRL peak MiB | memory ratio "
        "| ours MFU | TRL MFU | goal (speed, memory) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        o, t = r["ours"], r["trl"]
        lines.append(
            f"| {r['method']} | {r['peft']} | {o['tokens_per_sec']:.0f} | {t['tokens_per_sec']:.0f} | "
            f"{r['speed_ratio']:.2f}x | {o['peak_mib']:.0f} | {t['peak_mib']:.0f} | {r['memory_ratio']:.2f} | "
            f"{100 * o['mfu']:.1f}% | {100 * t['mfu']:.1f}% | {goal_text(r)} |"
        )
    return "\n".join(lines)


def write_section(title: str, text: str) -> None:
    """Replace (or add) one `## title` section of RESULTS.md, keeping the others."""
    results = ROOT / "RESULTS.md"
    old = results.read_text() if results.exists() else "# Benchmark results\n"
    head, sep, rest = old.partition(f"## {title}\n")
    tail = rest[rest.find("\n## ") + 1 :] if sep and "\n## " in rest else ""
    results.write_text(head.rstrip("\n") + f"\n\n## {title}\n\n{text}\n" + ("\n" + tail if tail else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["sft", "reward", "dpo", "kto", "orpo"], default="sft")
    parser.add_argument("--peft", choices=["none", "lora"], default="none")
    parser.add_argument("--all", action="store_true", help="every comparison, written to benchmarks/RESULTS.md")
    parser.add_argument("--levers", action="store_true", help="our step without each lever, into RESULTS.md")
    parser.add_argument("--objectives", action="store_true", help="KTO and ORPO against TRL, into RESULTS.md")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration; the fastest is kept")
    parser.add_argument("--shape", choices=list(SHAPES), default="llama", help="model and data shape (see SHAPES)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_shape(args.shape)
    if args.child:
        print(json.dumps(child(args.child, args.method, args.peft, args.variant)))
        return
    import torch

    torch.set_num_threads(2)
    peak = matmul_peak_flops()
    if args.levers:
        text = levers(peak, args.repeats)
        legend = "\n".join(f"- `{name}`: {what}" for name, what in (LEVERS | DPO_LEVERS | OPTIONS).items())
        write_section("Levers", f"{machine_line(peak, '--levers', args.repeats)}\n\n{legend}\n\n{text}")
        return
    combinations = COMBINATIONS if args.all else OBJECTIVES if args.objectives else [(args.method, args.peft)]
    runs = [(f, m, p, "") for m, p in combinations for f in ("ours", "trl")]
    checkpointed = [(m, p) for m, p in BOTH_CHECKPOINTING if args.all]
    runs += [("ours", m, p, "+gradient_checkpointing") for m, p in checkpointed]
    results = best_runs(runs, args.repeats)
    rows = [compare(method, peft, peak, results) for method, peft in combinations]
    rows += [compare(m, p, peak, results, "+gradient_checkpointing") for m, p in checkpointed]
    command = (
        "--all" if args.all else "--objectives" if args.objectives else f"--method {args.method} --peft {args.peft}"
    )
    text = table(rows, peak, args.repeats, command + f" --shape {SHAPE}")
    print("\n" + text)
    if args.all:  # a single comparison is printed only
        write_section("Against TRL" + ("" if SHAPE == "llama" else f", {SHAPE} shape"), text)
    elif args.objectives:
        write_section("KTO and ORPO against TRL", text)


if __name__ == "__main__":
    main()
