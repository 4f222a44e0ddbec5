"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`) under Lightning's `ModelParallelStrategy`:
each decoder layer, then the whole model, sharded over the strategy's data-parallel mesh. Lightning runs the
processes, places the shards and writes distributed checkpoints; torch's FSDP2 gathers and scatters the weights
and averages the gradients. A module not yet proven equal to one process under it is refused at start."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_align.scoring.model import unwrapped

# Strategies that shard weights: the output layer's weight is whole only inside the model's own forward.
SHARDING_STRATEGIES = {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "FSDP2Strategy"}
STRATEGY_LINE = (
    "--trainer.strategy fsdp2 (lightning-align's name for --trainer.strategy "
    "lightning.pytorch.strategies.ModelParallelStrategy --trainer.strategy.data_parallel_size <devices> "
    "--trainer.strategy.tensor_parallel_size 1)"
)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the classes a Hugging Face model names as never to be split
    (`_no_split_modules`), found inside any peft wrapper."""
    names = set(getattr(unwrapped(model), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def check_mesh(module_name: str, mesh, proven: bool, precomputed: bool = False) -> None:
    """Refuse what would run unsynchronised or unproven: tensor parallelism, a method not yet proven equal to one
    process when sharded, or precomputed reference log-probs (each process would score a different number of
    batches through the sharded reference)."""
    tensor_parallel = mesh["tensor_parallel"].size() if "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
    if tensor_parallel > 1:
        raise ValueError(
            f"ModelParallelStrategy with tensor_parallel_size={tensor_parallel}: tensor parallelism is not supported; "
            f"every process shards the model along the data-parallel axis instead ({STRATEGY_LINE}). Lightning's "
            "default tensor_parallel_size='auto' puts every process on the tensor-parallel axis"
        )
    if not proven:
        raise ValueError(
            f"{module_name} is not yet proven under ModelParallelStrategy (FSDP2): its sharded run is not shown equal "
            "to one process, so it is not run. Use strategy='ddp' (every process holds the whole model), or set its "
            "`shards_proven = True` once a test shows it (as tests/distributed/test_fsdp.py does for this library's "
            "methods)"
        )
    if precomputed:
        raise ValueError(
            "precompute_ref_logps under ModelParallelStrategy is not supported yet (each process would score a "
            "different number of batches through the sharded reference); use strategy='ddp' or a live reference"
        )


def shard(model: nn.Module, mesh) -> None:
    """FSDP2 over `mesh` (the data-parallel axis): each decoder layer its own unit (gathered for its forward and
    backward only), then the root (embeddings, final norm, output layer, score head, adapters outside layers). A
    plain module (a value head) is one unit. A network that trains keeps its root whole from forward to backward
    (FSDP2's default); a frozen one (reference copy, reward model) has no backward to free it, so its root is freed
    after each forward, else it would stay whole for the rest of the run."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers and hasattr(unwrapped(model), "config"):
        raise ValueError(
            f"{type(unwrapped(model)).__name__} names no decoder layer class (`_no_split_modules`), so it cannot be "
            "sharded per layer; use strategy='ddp'"
        )
    # bitsandbytes' 4-bit weights (QLoRA) stay whole on every process: FSDP2 would shard their packed bytes as
    # plain tensors, apart from their quantisation state. Frozen, they need no gradient synchronisation.
    quantised = {p for p in model.parameters() if type(p).__name__ == "Params4bit"}
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in quantised} or None)
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None, ignored_params=quantised or None)


@contextmanager
def gathered_while_decoding(model: nn.Module) -> Iterator[None]:
    """Sharded weights gathered by the first forward of a decode and kept for its later tokens (FSDP2 would gather
    and free every layer at every token), freed at its end. Nothing to do for unsharded weights."""
    from torch.distributed.fsdp import FSDPModule

    # The root keeps its weights after forward already (FSDP2's default); the layers would free theirs.
    layers = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    if layers and isinstance(model, FSDPModule):
        model.unshard()  # peft's `generate` calls the base model's, not the root's forward that would gather
    try:
        yield
    finally:
        for unit in [*layers, model] if layers else []:
            unit.reshard()
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module, trained_only: bool = False) -> dict:
    """The model's state dict gathered from the shards, on the CPU (every process must call this); with
    `trained_only`, only the weights that train (an adapter's), without gathering the frozen base."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trained_only)
    return get_model_state_dict(model, options=options)


def without_tied_copies(model: nn.Module, state: dict) -> dict:
    """`state` without the names of weights tied to an earlier one (an output layer tied to the embeddings):
    gathered from shards they are separate tensors, which `save_pretrained` would write twice."""
    seen, tied = set(), set()
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            tied.add(name)
        seen.add(id(parameter))
    return {name: value for name, value in state.items() if name not in tied}
