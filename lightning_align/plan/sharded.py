"""What FSDP2 holds whole, beyond each process's shards, at the moments of a sharded step that can be its peak.

Measured on 2 CPU processes (benchmarks/MEMORY.md, "Sharded"); the moments, as FSDP2 runs them:
- computing: the root (embeddings, final norm, output layer) whole from its forward to the end of backward, two
  decoder layers (the one computing and the next, prefetched), and the step's activations;
- gathering the root: its all-gather's output and the whole weights copied out of it, both at once;
- reducing the root's gradients (when the root trains): its whole gradients and the reduce-scatter's input they
  are copied into, with every process's sharded gradients; gloo (a CPU) adds a temporary of the input's size;
- sampling (PPO, GRPO): the whole policy, gathered once for the rollout's decode, with the KV cache.
"""

from __future__ import annotations

import dataclasses

import torch

from lightning_align.plan.formulas import gib, sharding_unit_bytes, text_config
from lightning_align.plan.spec import RunSpec
from lightning_align.plan.step import weight_dtype

GATHERED = "gathered whole while computing"


def sharded_moment(spec: RunSpec, config, parts: dict, trainable: int, generation: int, notes: list) -> None:
    """Set `parts`' gradients, activations and the part held whole to those of the largest moment above."""
    dtype = weight_dtype(dataclasses.replace(spec, adapter=None))
    root, layer = sharding_unit_bytes(config, dtype, scorer=spec.method == "reward")
    if spec.adapter == "qlora":  # a layer's 4-bit weights are whole already (in the weights); it gathers its norms
        layer = 0
    layers = text_config(config).num_hidden_layers
    online = spec.method in ("ppo", "grpo")
    activations_key = next(k for k in parts if k.startswith("activations"))
    trained_bytes = trainable * torch.finfo(weight_dtype(spec)).bits // 8 // spec.devices
    trained_root = 0 if spec.adapter else root  # an adapter leaves the root frozen
    moments = {
        "computing": (parts["gradients"], root + 2 * layer, parts[activations_key]),
        "gathering the root": (0, 2 * root, 0),  # at a forward's start: the last step's gradients are dropped
    }
    if trained_root:
        copies = 3 if spec.accelerator == "cpu" else 2
        moments["reducing the root's gradients"] = (trained_bytes, copies * trained_root, 0)
    if online:
        moments["sampling"] = (0, root + max(root, (layers + 1) * layer), generation)
    name, (gradients, gathered, activations) = max(moments.items(), key=lambda item: sum(item[1]))
    parts["gradients"], parts[GATHERED] = gradients, gathered
    parts[activations_key] = activations
    notes.append(
        f"fsdp: the peak is while {name} ({', '.join(f'{n} {gib(sum(v))}' for n, v in moments.items())}, "
        f"beside the shards); the root is {gib(root)} whole, a decoder layer {gib(layer)}"
    )
