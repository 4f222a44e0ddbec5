"""Attention inside each example of packed rows equals sdpa attention under the packed rows' block mask."""

import pytest
import torch

from lightning_align.scoring.attention import attention_within_examples, packed_examples
from lightning_align.scoring.forward import causal_lm_logits


def test_packed_examples_start_where_the_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_examples(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


@pytest.fixture
def packed_batch(tiny_model, plain_task_files):
    from lightning_align import SFTDataModule

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=6, max_length=64, packing=True)
    dm.setup("fit")
    batch = dm.collate(dm.train_set[:6])
    assert len(packed_examples(batch["position_ids"])[0]) == 6 and "attention_mask" not in batch
    return batch


@pytest.mark.parametrize("checkpointing", [False, True])
def test_within_examples_logits_and_gradients_equal_the_block_masked_sdpa(tiny_model, packed_batch, checkpointing):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config._attn_implementation == "sdpa"
    if checkpointing:  # the backward pass recomputes each layer: it must take the same kernel
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    results = []
    for within in (True, False):
        model.zero_grad()
        if within:
            logits = causal_lm_logits(model, packed_batch, within_examples=True)
        else:  # Hugging Face's own handling of packed rows: one block-diagonal mask over the whole row
            logits = model(**packed_batch, use_cache=False).logits
        (logits.square().mean()).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (within, within_grads), (masked, masked_grads) = results
    torch.testing.assert_close(within, masked, rtol=1e-5, atol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(within_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_kernel_gets_the_examples_only_for_packed_rows_and_is_sdpa_otherwise(tiny_model, packed_batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with attention_within_examples(model, packed_batch) as extra:
        assert extra["packed_examples"] == packed_examples(packed_batch["position_ids"])
    with attention_within_examples(model, packed_batch, enabled=False) as extra:
        assert extra == {}
    padded = {"input_ids": packed_batch["input_ids"], "attention_mask": torch.ones_like(packed_batch["input_ids"])}
    with attention_within_examples(model, padded) as extra:
        assert extra == {}
    assert model.config._attn_implementation == "sdpa"  # the model is never switched to another implementation
