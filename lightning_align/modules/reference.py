"""The reference model of DPO and PPO: which network plays pi_ref, and how to run it."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

from lightning_align.scoring.model import eval_mode


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def frozen(model: nn.Module) -> nn.Module:
    model = model.eval()
    model.requires_grad_(False)
    return model


START_ADAPTER = "start"  # the adapter name the LoRA callbacks give a frozen copy of a continued start adapter


class Reference:
    """pi_ref for a policy: the model the stage started from, or an explicit other model.

    - the policy with its start adapter switched in, when a LoRA / QLoRA run continues an adapter (a frozen copy of
      the adapter, never of the base);
    - the policy with its adapter disabled, under a fresh LoRA / QLoRA adapter (the base may hold a merged one);
    - a frozen copy of the starting policy, without adapters;
    - `ref_model` when given.

    The frozen network is held outside the LightningModule's submodules, so checkpoints do not carry a second
    copy of the weights; `to` follows the policy's device and dtype instead.
    """

    def __init__(self, policy: nn.Module, ref_model: nn.Module | None = None):
        self.uses_adapter = ref_model is None and is_peft_model(policy)
        self.start_adapter = self.uses_adapter and START_ADAPTER in policy.peft_config
        self.network = None if self.uses_adapter else frozen(ref_model or copy.deepcopy(policy))
        if ref_model is not None:
            self.kind = "explicit ref_model"
        elif self.start_adapter:
            self.kind = "frozen start adapter"
        elif self.uses_adapter:
            merged = getattr(policy, "start_adapter_merged", None)
            self.kind = "adapter-disabled base" + (f" (with '{merged}' merged in)" if merged else "")
        else:
            self.kind = "frozen copy of the starting policy"

    def to(self, like: nn.Module) -> None:
        if self.network is not None:
            param = next(like.parameters())
            floating = param.dtype if param.is_floating_point() else None
            self.network.to(device=param.device, dtype=floating)

    @contextmanager
    def __call__(self, policy: nn.Module):
        """The reference network, in a no-grad context and in eval mode (deterministic: no dropout, whatever the
        policy's settings)."""
        with torch.no_grad(), eval_mode(policy):
            if self.start_adapter:
                policy.set_adapter(START_ADAPTER, inference_mode=True)
                try:
                    yield policy
                finally:
                    policy.set_adapter("default")  # active and trainable again; the start adapter stays frozen
            elif self.uses_adapter:
                with policy.disable_adapter():
                    yield policy
            else:
                yield self.network
