"""Sharded training through Lightning's ModelParallelStrategy (FSDP2 over a data-parallel mesh) with 2 CPU processes
(gloo): SFT, the reward model, DPO (sigmoid full, IPO with LoRA), ORPO and KTO train as one process does with the same
global batch, export one consolidated Hugging Face folder, and what is not proven sharded (other methods, tensor
parallelism, precomputed reference log-probs) is refused at start."""

from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_two_and_one

SCRIPT = Path(__file__).with_name("fsdp_run.py")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    return run_on_two_and_one(SCRIPT, tmp_path_factory.mktemp("fsdp"))


@pytest.mark.parametrize("case", ["sft", "sft-lora", "reward", "dpo", "dpo-ipo-lora", "orpo", "kto"])
def test_two_sharded_processes_train_like_one_with_the_same_global_batch(runs, case):
    one, two = torch.load(runs / f"{case}-1.pt"), torch.load(runs / f"{case}-2.pt")
    assert two["sharded"] and not one["sharded"] and two["world_size"] == 2
    assert two["trainable"] == one["trainable"]  # the same parameters train (LoRA: the adapter only)
    assert one["weights"].keys() == two["weights"].keys()
    # AdamW's first steps divide by tiny second moments, magnifying float summation-order differences on weights
    # whose gradient is near 0: the sharded run must land where one process does, within a small share of how
    # far training moved the weights (unsynchronised replicas land as far apart as the steps are long).
    start = one["initial"]
    moved = sum((w - start[n]).abs().sum() for n, w in one["weights"].items())
    apart = sum((two["weights"][n] - w).abs().sum() for n, w in one["weights"].items())
    assert moved > 0 and apart <= 1e-3 * moved
    for name, weight in one["weights"].items():
        assert (two["weights"][name] - weight).abs().max() <= 0.25 * (weight - start[name]).abs().max() + 1e-7, name
    assert two["val"] == pytest.approx(one["val"], rel=1e-5)  # reduced over both processes' halves
    # Every step logs the global batch's loss, as one process with the whole batch does.
    assert len(two["losses"]) == 3 and two["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)


def test_the_sharded_export_is_one_hugging_face_folder_with_the_whole_weights(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trained = torch.load(runs / "sft-2.pt")["weights"]
    loaded = AutoModelForCausalLM.from_pretrained(runs / "sft" / "2" / "export").state_dict()
    for name, weight in trained.items():
        torch.testing.assert_close(loaded[name], weight, rtol=0, atol=0, msg=name)
    adapter = load_file(runs / "sft-lora" / "2" / "export" / "adapter_model.safetensors")
    lora = {k: v for k, v in torch.load(runs / "sft-lora-2.pt")["weights"].items() if "lora_" in k}
    assert len(adapter) == len(lora) > 0
    for name, weight in lora.items():
        torch.testing.assert_close(adapter[name.replace(".default", "")], weight, rtol=0, atol=0, msg=name)


def test_what_is_not_proven_sharded_is_refused_at_start(runs):
    refused = torch.load(runs / "refused.pt")
    assert "PPOModule is not yet proven under ModelParallelStrategy" in refused["ppo"]
    assert "strategy='ddp'" in refused["ppo"]
    assert "precompute_ref_logps under ModelParallelStrategy is not supported" in refused["dpo_precomputed"]
    assert "tensor parallelism is not supported" in refused["tensor_parallel"]
    assert "tensor_parallel_size 1" in refused["tensor_parallel"]
