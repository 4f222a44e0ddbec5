"""What a fake step cannot see, added by formula, each documented where it is computed: 4-bit storage, the
weights of models held beside the policy, generation's KV cache, what sharding divides, CUDA's own overheads."""

from __future__ import annotations

import copy
import math

import torch

GIB = 2**30
MIB = 2**20

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


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes' 4-bit storage: two weights a byte, one absmax per 64-weight block: a float32, or with double
    quantisation a byte plus a float32 per 256 blocks."""
    blocks = math.ceil(numel / 64)
    scales = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return math.ceil(numel / 2) + scales


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


def sharding_unit_bytes(config, dtype: torch.dtype, scorer: bool = False) -> tuple[int, int]:
    """(the root's weights: embeddings, final norm, output layer, or with `scorer` a score head; one decoder
    layer's), from the meta build: what FSDP2 holds whole while they compute (the root from forward to the end of
    backward, a layer during its own)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.initialization import no_init_weights

    if scorer:
        config = copy.deepcopy(config)
        config.num_labels = 1
    with torch.device("meta"), no_init_weights():
        auto = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
        model = auto.from_config(config, dtype=dtype)
    names = set(model._no_split_modules or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    layer = sum(p.numel() * p.element_size() for p in layers[0].parameters()) if layers else 0
    return total - layer * len(layers), layer


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / MIB:.1f} MiB"
