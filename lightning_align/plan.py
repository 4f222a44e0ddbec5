"""Will it fit? The peak memory per device of a training run, planned before launch without any weights.

The planner builds the run's model from its `config.json` on fake tensors (shapes and dtypes, no storage) and runs
one training step of our own code path on them: the body's forward, the chunked output layer (or the
`logits_to_keep` path sharded strategies take), the reference's no-grad forward, backward, and the AdamW step,
while PyTorch's `MemTracker` accounts every tensor. The step runs in Lightning's order (the previous step's
gradients are released after the next forward), on a micro-batch of rows as long as `max_length` (the longest
batch sets the peak). Added by formula, each documented where it is computed, is only what a fake run cannot see:
4-bit NF4 storage, the weights of models held beside the policy (reference copy, reward model, critic), generation's
KV cache, what a sharding strategy divides, and on GPUs the CUDA context and allocator slack.

    lightning-align plan --config examples/configs/dpo_qlora.yaml --device-memory 24GiB
    lightning-align plan --config examples/configs/sft_lora.yaml --model path/to/config.json --max-length 4096
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import time
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from lightning_align.modules.scoring import CHECKED_ROWS

GIB = 2**30
MIB = 2**20

MODULE_METHODS = {
    "SFTModule": "sft",
    "RewardModule": "reward",
    "DPOModule": "dpo",
    "ORPOModule": "orpo",
    "KTOModule": "kto",
    "PPOModule": "ppo",
    "GRPOModule": "grpo",
}
REFERENCE_FREE_DPO = {"simpo", "orpo", "sft"}
# Strategies and what each divides by the number of devices (ZeRO stage 1: optimiser states; 2: and gradients;
# 3 and FSDP's full sharding: and parameters).
SHARDED = {
    "fsdp": ("params", "grads", "optimizer"),
    "deepspeed_stage_3": ("params", "grads", "optimizer"),
    "deepspeed_stage_2": ("grads", "optimizer"),
    "deepspeed_stage_1": ("optimizer",),
}
# On a CUDA device: the context the driver takes (outside `max_memory_allocated`, inside nvidia-smi's figure) and
# the caching allocator's slack between freed blocks, as a share of the peak.
CUDA_CONTEXT_BYTES = 600 * MIB
ALLOCATOR_SLACK = 0.05
# cuBLAS's workspaces (CUBLAS_WORKSPACE_CONFIG's default, 8 x 4 MiB, through the caching allocator) and, with
# several devices, NCCL's buffers (NCCL_BUFFSIZE 4 MiB, send and receive, up to 32 channels): estimates, since
# neither library's allocations reach a fake run.
CUBLAS_WORKSPACE_BYTES = 32 * MIB
NCCL_BUFFER_BYTES = 256 * MIB
# DDP copies the gradients into buckets for the all-reduce (Lightning's DDP keeps `gradient_as_bucket_view` off).
DDP_BUCKET_COPY = 1.0


@dataclass
class RunSpec:
    """What sets a run's memory. `model`: a folder with `config.json`, or the file itself."""

    model: str | object  # a folder, its config.json, or a transformers config
    method: str = "sft"
    adapter: str | None = None  # "lora" or "qlora"
    r: int = 8
    target_modules: str | list[str] = "all-linear"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    precision: str = "32-true"
    torch_dtype: str | None = None  # the module's own `torch_dtype` (the weights' dtype as loaded)
    strategy: str = "auto"
    devices: int = 1
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    max_length: int = 1024
    uses_reference: bool = True
    precompute_ref_logps: bool = False
    scoring_check: str = "fallback"
    max_new_tokens: int = 128
    num_generations: int = 1
    minibatch_size: int | None = None
    reward_model: str | None = None
    critic: str | None = None

    @property
    def rows(self) -> int:
        """Rows of the training forward: preference methods score chosen and rejected rows together."""
        if self.method in ("dpo", "orpo", "reward"):
            return 2 * self.micro_batch
        if self.method in ("ppo", "grpo"):
            return self.minibatch_size or self.micro_batch * self.num_generations
        return self.micro_batch

    @property
    def sequence(self) -> int:
        """Tokens per training row: online methods learn on prompt (max_length) + generated tokens."""
        return self.max_length + (self.max_new_tokens if self.method in ("ppo", "grpo") else 0)

    @property
    def reference_forward(self) -> bool:
        return self.uses_reference and not self.precompute_ref_logps and self.method in ("dpo", "kto", "ppo", "grpo")

    def describe(self) -> str:
        adapter = f"{self.adapter} r={self.r}" if self.adapter else "no adapter"
        return (
            f"{self.method}, {adapter}, {self.precision}, strategy {self.strategy} x {self.devices} device(s), "
            f"micro-batch {self.micro_batch} x {self.max_length} tokens"
            + (f" + {self.max_new_tokens} generated" if self.method in ("ppo", "grpo") else "")
            + (", gradient checkpointing" if self.gradient_checkpointing else "")
            + (", precomputed reference log-probs" if self.precompute_ref_logps else "")
        )


@dataclass
class Plan:
    """Predicted bytes per device, by part; `peak` is what `torch.cuda.max_memory_allocated` should read."""

    spec: RunSpec
    parts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def cuda_overhead(self) -> int:
        """What a CUDA device holds beyond the tensors: context, cuBLAS workspaces, NCCL buffers (several devices)."""
        return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + (NCCL_BUFFER_BYTES if self.spec.devices > 1 else 0)

    def device_total(self, cuda: bool = True) -> int:
        """The peak plus, on a CUDA device, the overheads above and the allocator's slack: what it must hold."""
        return int(self.peak * (1 + ALLOCATOR_SLACK) + self.cuda_overhead) if cuda else self.peak

    def fits(self, device_memory: int) -> bool:
        return self.device_total() <= device_memory

    def table(self) -> str:
        lines = [f"plan for {self.spec.describe()}"]
        lines.append(
            f"  parameters: {self.total_params:,} ({self.trainable_params:,} trainable); weights by dtype: "
            + ", ".join(f"{dtype} {gib(n)}" for dtype, n in sorted(self.weights_by_dtype.items()))
        )
        width = max(len(name) for name in self.parts)
        for name, n in self.parts.items():
            lines.append(f"  {name:<{width}}  {gib(n):>10}")
        lines.append(f"  {'peak per device':<{width}}  {gib(self.peak):>10}")
        lines.append(
            f"  {'with CUDA context and slack':<{width}}  {gib(self.device_total()):>10}"
            f"  (+{self.cuda_overhead // MIB} MiB context and library buffers, +{ALLOCATOR_SLACK:.0%} allocator slack)"
        )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '24G' or a number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"device memory {text!r}: expected a size such as 24GiB or 80GB")
    number, prefix, unit = match.groups()
    power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
    base = 1000 if unit.upper() == "B" and prefix else 1024
    size = int(float(number) * base**power)
    if size <= 0:
        raise ValueError(f"device memory {text!r}: must be more than 0")
    return size


def at_least(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


# ----- the fake step -------------------------------------------------------------------------------------------
def load_config(model: str):
    from transformers import AutoConfig

    from lightning_align.demos.assets import resolve_model

    if not isinstance(model, (str, Path)):
        return model  # already a config
    path = Path(resolve_model(model))
    if path.is_file():
        if path.name == "config.json":
            _config_values(path)
            return AutoConfig.from_pretrained(path.parent)
        return _config_file(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model}: no config.json there; give a model folder or its config.json")
    _config_values(path / "config.json")  # a clear error for a broken file, before transformers reads it
    return AutoConfig.from_pretrained(path)


def _config_values(path: Path) -> dict:
    """A model config file's values; a file that is not a JSON object with a `model_type` is refused by name."""
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not a valid JSON model config ({getattr(err, 'msg', err)}{where})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path}: a model config is a JSON object with a 'model_type' (as config.json files are)")
    return values


def _config_file(path: Path):
    from transformers import AutoConfig

    values = _config_values(path)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def dequantising_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A 4-bit linear layer's forward as bitsandbytes runs it: the input cast to the compute dtype (that copy is
    saved for the backward pass), the product in the compute dtype, the output cast back to the input's dtype."""
    return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def weight_dtype(spec: RunSpec) -> torch.dtype:
    """The dtype the policy's weights are held in: mixed precision keeps float32 weights; "-true" precisions
    cast them."""
    if spec.adapter == "qlora":
        return torch.float32  # prepare_model_for_kbit_training upcasts every weight that is not quantised
    cast = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(spec.precision)
    return cast or (getattr(torch, spec.torch_dtype) if spec.torch_dtype else torch.float32)


def build_meta_model(spec: RunSpec, config) -> nn.Module:
    """The run's model with its adapter, on the meta device (no storage, no initialisation)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    dtype = weight_dtype(spec)
    with torch.device("meta"), no_init_weights():
        if spec.method == "reward":
            config = copy.deepcopy(config)
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.adapter:
            model.enable_input_require_grads()
    if spec.adapter:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=spec.r,
                lora_alpha=2 * spec.r,
                target_modules=spec.target_modules,
                modules_to_save=["score"] if spec.method == "reward" else None,
            ),
        )
    if spec.adapter == "qlora":  # stand-ins for the 4-bit layers: weights in the compute dtype, bnb's casts
        for linear in quantised_linears(model):
            shape = linear.weight.shape
            linear.weight = nn.Parameter(
                torch.empty(shape, dtype=getattr(torch, spec.compute_dtype), device="meta"), False
            )
            linear.forward = types.MethodType(dequantising_forward, linear)
    return model


def fake_storage(model: nn.Module, mode) -> None:
    """Give every meta parameter and buffer a fake tensor of its shape and dtype (tied weights stay tied)."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, tensor in list(getattr(module, kind).items()):
                if tensor is None:
                    continue
                if id(tensor) not in made:
                    with mode:
                        fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                    made[id(tensor)] = nn.Parameter(fake, tensor.requires_grad) if kind == "_parameters" else fake
                getattr(module, kind)[name] = made[id(tensor)]


def quantised_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers bitsandbytes stores in 4 bits: every one of the body's, not the output layer or a score
    head (transformers keeps those in full precision)."""
    from lightning_align.modules.base import unwrapped

    base = unwrapped(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    keep = {id(base.get_output_embeddings())} if hasattr(base, "get_output_embeddings") else set()
    keep |= {id(m) for name, m in base.named_modules() if name.split(".")[-1] == "score"}
    return [
        m
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in keep and "lora_" not in name and not m.weight.requires_grad
    ]


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes' 4-bit storage: two weights a byte, one absmax per 64-weight block: a float32, or with double
    quantisation a byte plus a float32 per 256 blocks."""
    blocks = math.ceil(numel / 64)
    scales = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


def step_loss(spec: RunSpec, model: nn.Module, ids: torch.Tensor, sharded: bool) -> torch.Tensor:
    """One training step's loss on static-shape rows, by our scoring path: the body, then the output layer
    applied a chunk at a time at the scored positions (`logits_to_keep` under sharded strategies)."""
    from lightning_align.losses import output_layer_logps, output_layer_nll
    from lightning_align.modules.base import body_of, last_hidden_state
    from lightning_align.modules.reward import body_and_score_head
    from lightning_align.modules.scoring import output_weight

    if spec.method == "reward":
        body, head = body_and_score_head(model)
        return head(last_hidden_state(body, model, {"input_ids": ids})[:, -1]).sum()
    # Preference and online rows score their answers; SFT rows may score every token (the most the path holds).
    start = 0 if spec.method == "sft" else ids.shape[1] // 2 if spec.method not in ("ppo", "grpo") else spec.max_length
    start = min(start, ids.shape[1] - 2)
    targets = ids[:, start + 1 :]
    weight = output_weight(model)
    if weight is not None and not sharded:
        hidden = last_hidden_state(body_of(model), model, {"input_ids": ids})
        hidden = hidden[:, start:-1].reshape(-1, hidden.shape[-1])
        if spec.method == "sft":  # SFT's loss is linear in the log-probs: gradients formed in the forward pass
            return output_layer_nll(hidden, weight, targets.reshape(-1), targets.numel())
        return output_layer_logps(hidden, weight, targets.reshape(-1)).sum()
    # As `token_logps_at`, whose row selection by the labels a fake run cannot take: every kept position scores.
    logits = model(input_ids=ids, use_cache=False, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).sum()


def reference_forward(spec: RunSpec, model: nn.Module, ids: torch.Tensor, sharded: bool) -> None:
    """The reference's no-grad forward over the same rows (the adapter-disabled policy, or a copy of the same
    shape: the same transient activations either way)."""
    disabled = model.disable_adapter() if spec.adapter else nullcontext()
    with torch.no_grad(), disabled:
        step_loss(spec, model, ids, sharded)


def peak_tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker

    class PeakTracker(MemTracker):
        """MemTracker keeping the global peak only: its per-module peaks cost a pass over every module per op."""

        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return PeakTracker


def logsumexp_as_the_kernel_runs(x: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """`torch.logsumexp` in the steps ATen's kernel takes, so the fake run sees its full-size temporary (x - max,
    exponentiated in place), which a fake kernel, allocating only the result, would hide."""
    maxes = x.amax(dim, keepdim=True)
    out = (x - maxes).exp_().sum(dim, keepdim=True).log_().add_(maxes)
    return out if keepdim else out.squeeze(dim)


@contextmanager
def tracked(*external):
    """A PeakTracker over the model (and optimiser) given, entered."""
    tracker = peak_tracker_class()()
    inert = mock.Mock()  # frozen weights get no gradient hook (MemTracker would try to add one to each)
    frozen = [p for m in external if isinstance(m, nn.Module) for p in m.parameters() if not p.requires_grad]
    tracker._param_to_grad_hook_handles.update({p: (inert, inert) for p in frozen})
    tracker.track_external(*external)
    with tracker:
        yield tracker


def check_forward(model: nn.Module, ids: torch.Tensor, responses: int | None = None) -> None:
    """The scoring check's reference side (`scoring.checked_plan`): the model's own padded forward with full
    logits, in float32, without autocast, no grad; scored at every position (`token_logps`), or as online RL's
    `response_forward` scores the last `responses` positions."""
    from lightning_align.losses import token_logps

    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        logits = model(input_ids=ids, use_cache=False).logits
        if responses is None:
            token_logps(logits, ids)
            return
        sliced = logits[:, -responses - 1 : -1].float() / 1.0  # the temperature's division: a copy
        torch.log_softmax(sliced, -1).gather(-1, ids[:, -responses:].unsqueeze(-1))


class TrainingStep(nn.Module):
    """A step's forward as one module call: the policy's scored rows, KTO's mismatched rows (no grad), the
    reference's forward (MemTracker accepts a module called twice only under a common parent)."""

    def __init__(self, spec: RunSpec, model: nn.Module, sharded: bool, autocast):
        super().__init__()
        self.spec, self.model, self.sharded, self.autocast = spec, model, sharded, autocast

    def forward(self, ids: torch.Tensor, mismatched: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        with self.autocast:
            loss = step_loss(spec, self.model, ids, self.sharded)
            if spec.method == "kto":
                with torch.no_grad():
                    step_loss(spec, self.model, mismatched, self.sharded)
            if spec.reference_forward:
                rows = torch.cat([ids, mismatched]) if spec.method == "kto" else ids
                reference_forward(spec, self.model, rows, self.sharded)
        return loss


def measure_step(spec: RunSpec, config) -> dict[str, int]:
    """Bytes of each kind at two moments of one fake step of the run's policy (the end of the forward pass, the
    step's peak), the weights by dtype, and the parameter counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_meta_model(spec, config)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_storage(model, mode)
    sharded = spec.strategy.startswith(("fsdp", "deepspeed"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    mixed = spec.precision.endswith("-mixed")
    autocast_dtype = torch.float16 if spec.precision.startswith("16") else torch.bfloat16
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if mixed else nullcontext()
    step = TrainingStep(spec, model, sharded, autocast)
    with mode, mock.patch.object(torch, "logsumexp", logsumexp_as_the_kernel_runs):
        rows = spec.rows if spec.method != "kto" else spec.micro_batch
        ids = torch.zeros(rows, spec.sequence, dtype=torch.long)
        mismatched = torch.zeros(spec.micro_batch, spec.sequence, dtype=torch.long)
        # As `AlignModule.configure_optimizers`: fused AdamW, but the foreach one under mixed precision.
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, **({"foreach": True} if mixed else {"fused": True}))
        first_batch_check = {"total": 0}
        if spec.scoring_check != "off" and spec.method != "reward" and not sharded:
            with tracked(model) as tracker:  # the first batch's check of the fast path: the model's own forward
                online = spec.max_new_tokens if spec.method in ("ppo", "grpo") else None
                check_forward(model, ids[:CHECKED_ROWS], online)
            first_batch_check = category_bytes(tracker.get_tracker_snapshot("peak"))
        for p in trainable:  # the state after a first step: gradients and optimiser states exist
            p.grad = torch.zeros_like(p)
        optimizer.step()
        if spec.method in ("ppo", "grpo"):  # `OnlineRLModule.optimizer_step` drops them after each step
            optimizer.zero_grad(set_to_none=True)
        with tracked(model, optimizer) as tracker:
            # Lightning's order (automatic optimisation): the last step's gradients live through this forward.
            loss = step(ids, mismatched)
            forward_end = category_bytes(tracker.get_tracker_snapshot())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            peak = category_bytes(tracker.get_tracker_snapshot("peak"))
    weights_by_dtype: dict[str, int] = {}
    unique = {id(p): p for p in model.parameters()}.values()
    for p in unique:
        dtype = str(p.dtype).removeprefix("torch.")
        weights_by_dtype[dtype] = weights_by_dtype.get(dtype, 0) + p.numel() * p.element_size()
    quantised = quantised_linears(model) if spec.adapter == "qlora" else []
    counts = {
        "trainable": sum(p.numel() for p in trainable),
        "total": sum(p.numel() for p in unique),
        "quantised": sum(m.weight.numel() * m.weight.element_size() for m in quantised),
        "nf4": sum(nf4_bytes(m.weight.numel(), spec.double_quant) for m in quantised),
    }
    counts.update({f"dtype:{dtype}": n for dtype, n in weights_by_dtype.items()})
    counts.update({f"peak:{key}": n for key, n in peak.items()})
    counts.update({f"forward_end:{key}": n for key, n in forward_end.items()})
    counts.update({f"first_batch_check:{key}": n for key, n in first_batch_check.items()})
    # bitsandbytes dequantises one weight at a time for its matrix products: the largest is held at some point.
    counts["dequantised"] = max((m.weight.numel() * m.weight.element_size() for m in quantised), default=0)
    return counts


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def uniform_layers(config) -> bool:
    """Whether every decoder layer of this config is built alike, so that memory grows by the same amount with
    each: no per-layer types that differ (sliding / full attention, linear attention), no dense layers among
    expert layers."""
    text = text_config(config)
    kinds = getattr(text, "layer_types", None)
    if kinds is not None and len(set(kinds)) > 1:
        return False
    special = ("first_k_dense_replace", "mlp_only_layers", "decoder_sparse_step", "moe_layer_freq", "no_rope_layers")
    return not any(getattr(text, name, None) not in (None, 0, 1, [], ()) for name in special)


def with_depth(config, layers: int):
    config = copy.deepcopy(config)
    text = text_config(config)
    text.num_hidden_layers = layers
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = text.layer_types[:layers]
    return config


# Depths measured for a model of uniform layers: memory at depth N is m(a) + (N - a) (m(b) - m(a)), used only
# where the third depth shows the same growth per layer (else the model is built in full).
SHALLOW_DEPTHS = (2, 3, 4)


def measure(spec: RunSpec, config) -> tuple[dict[str, int], bool]:
    """`measure_step` of the run at the model's full depth: from three shallow copies where the layers are
    uniform and each added layer adds the same to every figure (a 70B model in seconds), else by building every
    layer. Says which."""
    depth = text_config(config).num_hidden_layers
    low, mid, high = SHALLOW_DEPTHS
    if depth > high and uniform_layers(config):
        a, b, c = (measure_step(spec, with_depth(config, n)) for n in SHALLOW_DEPTHS)
        linear = all((c[key] - b[key]) * (mid - low) == (b[key] - a[key]) * (high - mid) for key in c)
        if linear:
            counts = {key: a[key] + (depth - low) * (b[key] - a[key]) // (mid - low) for key in b}
            counts["dequantised"] = b["dequantised"]
            return counts, True
    return measure_step(spec, config), False


def category_bytes(snapshot: dict) -> dict[str, int]:
    """MemTracker's snapshot as {params, grads, optimizer, activations, total} bytes (summed over devices)."""
    out = {"params": 0, "grads": 0, "optimizer": 0, "activations": 0, "total": 0}
    for per_device in snapshot.values():
        for kind, n in per_device.items():
            name = getattr(kind, "value", kind)
            key = {"Parameter": "params", "Buffer": "params", "Gradient": "grads", "Optstate": "optimizer"}.get(
                name, "total" if name == "Total" else "activations"
            )
            out[key] += n
    return out


# ----- what the fake step cannot see ---------------------------------------------------------------------------
def model_bytes(config, dtype: torch.dtype, scorer: bool = False) -> int:
    """The weights of a model of this config held beside the policy (reference copy; with `scorer`, a reward
    model or critic: a score head instead of the output layer), from its meta build: no storage is made."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    if scorer:
        config = copy.deepcopy(config)
        config.num_labels = 1
    with torch.device("meta"), no_init_weights():
        auto = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
        model = auto.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def output_layer_note(spec: RunSpec, config) -> str:
    """What the output layer holds on our path, against the full logits a plain forward would make."""
    vocab = text_config(config).vocab_size
    full = spec.rows * spec.sequence * vocab * 4
    if spec.strategy.startswith(("fsdp", "deepspeed")):
        return (
            f"output layer: logits of the scored positions only (logits_to_keep, as sharded weights require); "
            f"full float32 logits would be {gib(full)}"
        )
    chunk = max(1, 2**22 // vocab) * vocab * 4  # as losses.output_layer_logps
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
    if spec.strategy.startswith("ddp") and spec.devices > 1:
        parts["DDP gradient buckets"] = int(peak["grads"] * DDP_BUCKET_COPY)
    frozen_dtype = {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(spec.precision, torch.float32)
    if spec.method in ("dpo", "kto", "ppo", "grpo") and spec.uses_reference and not spec.adapter:
        if spec.precompute_ref_logps:
            notes.append("reference log-probs precomputed: the reference is released before training")
        else:
            parts["reference model (frozen copy)"] = model_bytes(config, weight_dtype(spec))
    if spec.method == "ppo" and spec.critic:
        critic = model_bytes(load_config(spec.critic), weight_dtype(dataclasses.replace(spec, adapter=None)), True)
        parts["critic (weights, gradients, AdamW)"] = 4 * critic  # weights + gradients + two AdamW moments
    if spec.method in ("ppo", "grpo"):
        if spec.reward_model:
            parts["reward model"] = model_bytes(load_config(spec.reward_model), frozen_dtype, scorer=True)
        generation = kv_cache_bytes(spec, config, torch.bfloat16 if spec.precision.startswith("bf16") else frozen_dtype)
        notes.append(
            f"generation's KV cache ({gib(generation)}) is held while sampling, when no activations are: "
            "the larger of the two counts"
        )
        parts["activations"] = max(parts.pop(next(k for k in parts if k.startswith("activations"))), generation)
    plan = Plan(
        spec,
        parts,
        notes,
        weights,
        measured["trainable"],
        measured["total"],
    )
    plan.seconds = time.perf_counter() - started
    return plan


# ----- the cheapest change that fits ---------------------------------------------------------------------------
def changes(spec: RunSpec) -> list[tuple[str, RunSpec]]:
    """Changes to try, cheapest first: those that keep the result the same before those that change it."""
    out = []
    if not spec.gradient_checkpointing:
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
    if spec.reference_forward and not spec.adapter and spec.method in ("dpo", "kto"):
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


# ----- from a `fit` config -------------------------------------------------------------------------------------
def spec_from_config(path: str | Path, **overrides) -> RunSpec:
    """The RunSpec of a `lightning-align fit` config file; `overrides` (RunSpec fields) win."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    model = config.get("model", {})
    module = model.get("class_path", "lightning_align.SFTModule").rsplit(".", 1)[-1]
    if module not in MODULE_METHODS:
        raise ValueError(f"{path}: model.class_path {module}: the planner knows {', '.join(MODULE_METHODS)}")
    args = model.get("init_args", {})
    data = config.get("data", {}).get("init_args", {})
    trainer = config.get("trainer", {})
    values = {
        "model": args.get("model") or args.get("policy") or data.get("tokenizer"),
        "method": MODULE_METHODS[module],
        "precision": str(trainer.get("precision", "32-true")),
        "strategy": trainer.get("strategy", "auto") if isinstance(trainer.get("strategy", "auto"), str) else "auto",
        "devices": trainer.get("devices", 1) if isinstance(trainer.get("devices", 1), int) else 1,
        "gradient_checkpointing": bool(args.get("gradient_checkpointing", False)),
        "torch_dtype": args.get("torch_dtype"),
        "micro_batch": data.get("batch_size", 8),
        "max_length": data.get("max_length", 1024),
        "precompute_ref_logps": bool(args.get("precompute_ref_logps") or args.get("ref_cache_dir")),
        "scoring_check": args.get("scoring_check", "fallback"),
        "max_new_tokens": args.get("max_new_tokens", 128),
        "num_generations": args.get("num_generations", 1),
        "minibatch_size": args.get("minibatch_size"),
        "critic": args.get("critic"),
    }
    loss_types = args.get("loss_type", "sigmoid")
    loss_types = loss_types if isinstance(loss_types, list) else [loss_types]
    if module == "DPOModule" and all(kind in REFERENCE_FREE_DPO for kind in loss_types) or module == "ORPOModule":
        values["uses_reference"] = False
    if module == "GRPOModule" and not args.get("beta"):
        values["uses_reference"] = args.get("advantage") == "reinforce++"
    reward = args.get("reward")
    rewards = reward if isinstance(reward, list) else [reward]
    folders = [r for r in rewards if isinstance(r, str) and ":" not in r and (Path(r) / "config.json").exists()]
    values["reward_model"] = folders[0] if folders else None
    for callback in trainer.get("callbacks", []) or []:
        name = str(callback.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(callback, dict) else ""
        if name in ("LoRA", "QLoRA"):
            init = callback.get("init_args", {})
            values.update(adapter=name.lower(), r=init.get("r", 8))
            values["target_modules"] = init.get("target_modules", "all-linear")
            if name == "QLoRA":
                values["double_quant"] = init.get("double_quant", True)
                values["compute_dtype"] = init.get("compute_dtype", "bfloat16")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunSpec(**values)


def spec_from_run(trainer, module, datamodule=None) -> RunSpec:
    """The RunSpec of a live run: its module, adapter callback, precision, strategy and data settings."""
    from lightning_align.modules.base import unwrapped

    method = next((MODULE_METHODS[c.__name__] for c in type(module).__mro__ if c.__name__ in MODULE_METHODS), None)
    if method is None:
        raise ValueError(f"the planner does not know {type(module).__name__}")
    values = {"model": module.model_name_or_path or unwrapped(module.model).config, "method": method}
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if name in ("LoRA", "QLoRA"):
            values.update(adapter=name.lower(), r=callback.r, target_modules=callback.target_modules)
            if name == "QLoRA":
                values.update(double_quant=callback.double_quant, compute_dtype=callback.compute_dtype)
    strategy = type(trainer.strategy).__name__
    deepspeed = getattr(trainer.strategy, "config", None) or {}  # DeepSpeedStrategy's config dict
    stage = deepspeed.get("zero_optimization", {}).get("stage") if isinstance(deepspeed, dict) else None
    values["strategy"] = {"DDPStrategy": "ddp", "FSDPStrategy": "fsdp"}.get(
        strategy, f"deepspeed_stage_{stage}" if strategy == "DeepSpeedStrategy" else "auto"
    )
    values.update(devices=trainer.world_size, precision=str(trainer.precision), torch_dtype=module.torch_dtype)
    values["gradient_checkpointing"] = bool(module.gradient_checkpointing)
    datamodule = datamodule or getattr(trainer, "datamodule", None)
    if datamodule is not None:
        values.update(micro_batch=datamodule.batch_size, max_length=datamodule.max_length)
    # Called after configure_model, before the module's own on_fit_start (which may release a precomputed one).
    values["uses_reference"] = getattr(module, "reference", None) is not None
    values["precompute_ref_logps"] = bool(getattr(module, "precompute_ref_logps", False))
    if getattr(module, "scoring", None) is not None:
        values["scoring_check"] = module.scoring.check
    for name in ("num_generations", "minibatch_size"):
        if getattr(module, name, None) is not None:
            values[name] = getattr(module, name)
    if "max_new_tokens" in getattr(module, "sampling", {}):
        values["max_new_tokens"] = module.sampling["max_new_tokens"]
    return RunSpec(**values)


def local_device_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-align plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the config `lightning-align fit` would run")
    parser.add_argument("--model", help="another model: a folder with config.json, or the file (no weights needed)")
    parser.add_argument("--device-memory", help="the device's memory, e.g. 24GiB (default: the local GPU's)")
    parser.add_argument("--micro-batch", type=at_least(1))
    parser.add_argument("--max-length", type=at_least(2))
    parser.add_argument("--precision")
    parser.add_argument("--strategy")
    parser.add_argument("--devices", type=at_least(1))
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
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
