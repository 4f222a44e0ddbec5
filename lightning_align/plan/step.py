"""The measured step: the run's model built from its config on fake tensors (shapes and dtypes, no storage), and
one training step of the method module's own code on it, while PyTorch's `MemTracker` accounts every tensor."""

from __future__ import annotations

import copy
import types
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from lightning_align.modules.checkpointing import enable_checkpointing
from lightning_align.plan.formulas import nf4_bytes, text_config
from lightning_align.plan.spec import RunSpec
from lightning_align.scoring.model import eval_mode, unwrapped
from lightning_align.scoring.plan import CHECKED_ROWS, fastest_plan

aten = torch.ops.aten


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
            if config.pad_token_id is None:  # as `RewardModule.load_model` sets it, from the tokenizer
                config.pad_token_id = 0
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if spec.gradient_checkpointing:
        enable_checkpointing(model, spec.gradient_checkpointing)
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
    from lightning_align.scoring.model import unwrapped

    base = unwrapped(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    keep = {id(base.get_output_embeddings())} if hasattr(base, "get_output_embeddings") else set()
    keep |= {id(m) for name, m in base.named_modules() if name.split(".")[-1] == "score"}
    return [
        m
        for name, m in base.named_modules()
        if isinstance(m, nn.Linear) and id(m) not in keep and "lora_" not in name and not m.weight.requires_grad
    ]


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


class RealBatch(TorchDispatchMode):
    """Lets a module's own step run on fake weights with a real batch: ops on real tensors only (masks, counts,
    positions: the batch's layout) run for real, and a fake tensor indexed by a real boolean mask is indexed by
    the mask's positions instead, so every shape is known (a fake tensor alone cannot tell how many are true)."""

    INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with _disable_current_modes():
                return func(*args, **kwargs)
        if func is aten.masked_select.default and real_mask(args[1]):  # as self[mask], the mask broadcast
            shape = torch.broadcast_shapes(args[0].shape, args[1].shape)
            with _disable_current_modes():
                positions = list(args[1].expand(shape).nonzero().unbind(1))
            return aten.index.Tensor(args[0].expand(shape), positions)
        if func in self.INDEXING and any(real_mask(index) for index in args[1]):
            positions = []
            for index in args[1]:
                if real_mask(index):
                    with _disable_current_modes():
                        positions += list(index.nonzero().unbind(1))
                else:
                    positions.append(index)
            return func(args[0], positions, *args[2:], **kwargs)
        return func(*args, **kwargs)


def real_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool


class PolicyAsReference:
    """The reference's forward run on the policy's own network: the same transient activations (under LoRA the
    reference is that network with its adapter disabled; a frozen copy's weights are added by formula)."""

    @contextmanager
    def __call__(self, policy: nn.Module):
        disabled = policy.disable_adapter() if hasattr(policy, "peft_config") else nullcontext()
        with torch.no_grad(), eval_mode(policy), disabled:
            yield policy


def no_reward(prompts, completions):
    return [0.0] * len(completions)


def method_module(spec: RunSpec, model: nn.Module, sharded: bool):
    """The run's method module around the fake model, as `configure_model` leaves it, its scoring plan decided
    as a run's first batch would decide it for this model and strategy (the padded rows every plan checks)."""
    from lightning_align.modules import DPOModule, GRPOModule, KTOModule, ORPOModule, PPOModule, RewardModule, SFTModule

    if spec.method == "dpo":
        module = DPOModule(model, loss_type="sigmoid" if spec.uses_reference else "simpo")
    elif spec.method == "ppo":
        module = PPOModule(model, no_reward, max_new_tokens=spec.max_new_tokens)
        module.value_head = nn.Linear(model.config.hidden_size, 1, device="meta", dtype=weight_dtype(spec))
    elif spec.method == "grpo":
        module = GRPOModule(
            model,
            no_reward,
            num_generations=max(2, spec.num_generations),  # the rows are the batch's; GRPO refuses fewer
            beta=0.04 if spec.uses_reference else 0.0,
            max_new_tokens=spec.max_new_tokens,
        )
    else:
        classes = {"sft": SFTModule, "reward": RewardModule, "orpo": ORPOModule, "kto": KTOModule}
        module = classes[spec.method](model)
    module.reference = PolicyAsReference()
    module.scoring.plans[id(unwrapped(model))] = fastest_plan(model, torch.device("cpu"), sharded, packing=False)
    return module


def method_batch(spec: RunSpec) -> dict:
    """A batch of the method's kind, every row `spec.sequence` tokens (the longest batch sets the peak): labelled
    rows score their answers (their second half; SFT every token), online rows their generated tokens."""
    rows = spec.rows if spec.method != "kto" else 2 * spec.micro_batch  # KTO: each example and its mismatched row
    ids = torch.zeros(rows, spec.sequence, dtype=torch.long)
    ones = torch.ones_like(ids)
    if spec.method in ("ppo", "grpo"):
        zeros = torch.zeros(rows, spec.response_tokens)
        return {
            "sequences": ids,
            "attention_mask": ones,
            "prompt_length": spec.max_length,
            "mask": zeros + 1,
            "loss_mask": zeros + 1,
            **{key: zeros for key in ("logprobs", "ref_logprobs", "advantages", "values", "returns")},
        }
    labels = ids.clone()
    if spec.method not in ("sft", "reward"):
        labels[:, : min(spec.sequence // 2, spec.sequence - 2)] = -100
    batch = {"input_ids": ids, "attention_mask": ones, "labels": labels}
    if spec.method == "kto":
        batch["desirable"] = torch.arange(spec.micro_batch) % 2 == 0
    return batch


class TrainingStep(nn.Module):
    """A step's forward as one module call (MemTracker accepts a network called twice, as the policy and as its
    reference, only under a common parent): the method module's own `step_losses`, and for online methods the
    reference's scoring of the rollout, which their rollout does before the step."""

    def __init__(self, spec: RunSpec, module, autocast):
        super().__init__()
        self.spec, self.module, self.autocast = spec, module, autocast

    def forward(self, batch: dict) -> torch.Tensor:
        module = self.module
        with self.autocast:
            loss = sum(module.step_losses(batch))
            if self.spec.method in ("ppo", "grpo") and self.spec.reference_forward:
                with module.reference(module.model) as reference:
                    module.response_logps(reference, batch)
        return loss


def measure_step(spec: RunSpec, config) -> dict[str, int]:
    """Bytes of each kind at two moments of one fake step of the run's policy (the end of the forward pass, the
    step's peak), the weights by dtype, and the parameter counts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = build_meta_model(spec, config)
    sharded = spec.strategy.startswith(("fsdp", "deepspeed"))
    module = method_module(spec, model, sharded)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_storage(module, mode)
    trainable = [p for p in module.parameters() if p.requires_grad]
    mixed = spec.precision.endswith("-mixed")
    autocast_dtype = torch.float16 if spec.precision.startswith("16") else torch.bfloat16
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if mixed else nullcontext()
    step = TrainingStep(spec, module, autocast)
    batch = method_batch(spec)
    with mode, RealBatch(), mock.patch.object(torch, "logsumexp", logsumexp_as_the_kernel_runs):
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)  # as `modules.optimisation.adamw`
        first_batch_check = {"total": 0}
        if spec.scoring_check != "off" and spec.method != "reward" and not sharded:
            checked = min(CHECKED_ROWS, spec.micro_batch) if spec.method == "kto" else CHECKED_ROWS  # examples only
            ids = batch["sequences" if spec.method in ("ppo", "grpo") else "input_ids"][:checked]
            with tracked(model) as tracker:  # the first batch's check of the fast path: the model's own forward
                online = spec.response_tokens if spec.method in ("ppo", "grpo") else None
                check_forward(model, ids, online)
            first_batch_check = category_bytes(tracker.get_tracker_snapshot("peak"))
        for p in trainable:  # the state after a first step: gradients and optimiser states exist
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # every module drops them after its step (modules/base.py)
        with tracked(model, optimizer) as tracker:
            loss = step(batch)
            forward_end = category_bytes(tracker.get_tracker_snapshot())
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
