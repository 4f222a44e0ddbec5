"""Sharded training through Lightning's ModelParallelStrategy (FSDP2 over a data-parallel mesh) with 2 CPU processes
(gloo): SFT, the reward model, DPO (sigmoid full, IPO with LoRA), ORPO, KTO, PPO and GRPO (full and LoRA) train as one
process does with the same global batch, export one consolidated Hugging Face folder, and what is not proven sharded
(a method not shown equal, tensor parallelism, precomputed reference log-probs) is refused at start."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_two_and_one
from tests.distributed.fsdp_run import CASES  # the runs the script makes, each compared below

SCRIPT = Path(__file__).with_name("fsdp_run.py")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    save_reward_model(out / "reward-model")
    return run_on_two_and_one(SCRIPT, out)


def save_reward_model(folder: Path) -> None:
    """The tiny model as a sequence classifier with a seeded score head: a reward model for PPO to shard."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightning_align.assets import resolve_model
    from lightning_align.demos.assets import DEMO_MODEL

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEMO_MODEL))
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(DEMO_MODEL), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# What each step of the online methods logs, over the global batch (one process's whole batch): the losses, and the
# rollout's statistics, which differ unless both runs sample the same tokens.
ONLINE = ["loss", "loss/policy", "loss/value", "reward/mean", "response_length", "kl", "entropy", "policy/clipfrac"]


def logged(run: dict) -> list:
    steps = run["losses"]
    if steps and isinstance(steps[0], dict):
        return [[step[name] for name in ONLINE if name in step] for step in steps]
    return [[loss] for loss in steps]


@pytest.mark.parametrize("case", CASES)
def test_two_sharded_processes_train_like_one_with_the_same_global_batch(runs, case):
    one, two = torch.load(runs / f"{case}-1.pt"), torch.load(runs / f"{case}-2.pt")
    assert two["sharded"] and not one["sharded"] and two["world_size"] == 2
    assert two["trainable"] == one["trainable"]  # the same parameters train (LoRA: the adapter only)
    assert one["weights"].keys() == two["weights"].keys()
    # AdamW's first steps divide by tiny second moments, magnifying float summation-order differences on weights
    # whose gradient is near 0: the sharded run must land where one process does, within a small share of how
    # far training moved the weights (unsynchronised replicas land as far apart as the steps are long).
    start = one["initial"]
    # (QLoRA: its 4-bit weights' packed bytes and serialised quantisation state are compared by the keys only.)
    weights = {n: w for n, w in one["weights"].items() if w.is_floating_point()}
    moved = sum((w - start[n]).abs().sum() for n, w in weights.items())
    apart = sum((two["weights"][n] - w).abs().sum() for n, w in weights.items())
    # bf16 products (autocast, or QLoRA's default compute_dtype) round to 8 significant bits, and a 4-row product
    # rounds apart from an 8-row one: ten times the float32 tolerances, still far below unsynchronised replicas.
    # (QLoRA landed 1.13e-3 of the distance moved apart on one machine, under 1e-3 on another.)
    loose = 10 if case.endswith(("bf16-mixed", "qlora")) else 1
    mixed = case.endswith("bf16-mixed")
    assert two["precision"] == one["precision"] == ("MixedPrecision bf16-mixed" if mixed else "Precision 32-true")
    assert moved > 0 and apart <= 1e-3 * loose * moved
    for name, weight in weights.items():
        bound = 0.25 * loose * (weight - start[name]).abs().max() + 1e-7
        assert (two["weights"][name] - weight).abs().max() <= bound, name
    assert two["val"] == pytest.approx(one["val"], rel=1e-5 * loose**2)  # reduced over both processes' halves
    # Every step logs the global batch's loss, as one process with the whole batch does.
    assert len(two["losses"]) == 3
    for step_two, step_one in zip(logged(two), logged(one), strict=True):
        assert step_two == pytest.approx(step_one, rel=1e-4 * loose**2, abs=1e-6)


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


def test_a_sharded_lora_run_exports_the_adapter_merged_into_the_whole_weights(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_align.assets import resolve_model
    from lightning_align.demos.assets import DEMO_MODEL

    merged = AutoModelForCausalLM.from_pretrained(runs / "sft-lora" / "2" / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(DEMO_MODEL)).state_dict()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(resolve_model(DEMO_MODEL)), runs / "sft-lora" / "2" / "export"
    )
    expected = adapted.merge_and_unload().state_dict()  # merged in one process from the adapter export
    assert merged.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, rtol=0, atol=1e-6, msg=name)
    assert any((merged[n] - w).abs().max() > 1e-4 for n, w in base.items())  # the adapter is in it


@pytest.mark.parametrize("case", CASES)
def test_the_first_batch_checks_the_scoring_path_under_sharding_too(runs, case):
    one, two = torch.load(runs / f"{case}-1.pt"), torch.load(runs / f"{case}-2.pt")
    assert two["checked"] and all(two["checked"])  # not skipped: every process checked, and they agreed
    # The same packing as one process, except where packing needs a head outside the model's forward, which gathers
    # its weights: the reward model's score head, and online RL (packed only with the chunked output layer). The
    # output layer runs through the model's forward (its weight is sharded).
    padded = case.startswith(("reward", "ppo", "grpo"))  # (a reward model's plan is its own module's, not here)
    packings = ["padded" if padded else packing for packing, _ in one["plans"]]
    assert [packing for packing, _ in two["plans"]] == packings
    assert all(layer != "chunked" for _, layer in two["plans"])


def test_a_reward_model_scoring_the_rollouts_is_sharded_like_the_policy(runs):
    one, two = torch.load(runs / "ppo-reward-model-1.pt"), torch.load(runs / "ppo-reward-model-2.pt")
    assert two["reward_model_sharded"] and not one["reward_model_sharded"]
    assert two["losses"][0]["reward/mean"] != 0  # it scored (the equality with one process is asserted above)


def test_sampling_with_sharded_weights_gathers_them_once_per_rollout_batch_not_per_token(runs):
    gathers, tokens, units = torch.load(runs / "ppo-2.pt")["gathers"]
    assert tokens > 1 and units >= 3  # the root and a unit per decoder layer
    assert gathers == units  # each unit gathered once for the whole decode (per token it would be tokens x units)


def test_what_is_not_proven_sharded_is_refused_at_start(runs):
    refused = torch.load(runs / "refused.pt")
    assert "Unproven is not yet proven under ModelParallelStrategy" in refused["unproven"]
    assert "strategy='ddp'" in refused["unproven"]
    assert "precompute_ref_logps under ModelParallelStrategy is not supported" in refused["dpo_precomputed"]
    assert "tensor parallelism is not supported" in refused["tensor_parallel"]
    assert "tensor_parallel_size 1" in refused["tensor_parallel"]


@pytest.mark.parametrize("case", ["dpo", "grpo", "sft-lora"])
def test_a_run_resumed_from_the_distributed_checkpoint_continues_exactly(runs, case):
    saved = torch.load(runs / "resume" / f"{case}.pt")
    assert saved["checkpoint_is_sharded"]  # Lightning's distributed checkpoint: a folder of shards
    straight, resumed = logged(saved["straight"]), logged(saved["resumed"])
    assert len(straight) == 4 and resumed == straight[2:]  # the same losses (and GRPO: the same samples)
    for name, weight in saved["straight"]["weights"].items():
        torch.testing.assert_close(saved["resumed"]["weights"][name], weight, rtol=0, atol=0, msg=name)


def test_two_nodes_started_by_torchrun_train_like_one_process(runs):
    """`torchrun --nnodes 2` on localhost, one process per node: Lightning's multi-node path, sharded over both."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[2])}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
            + ["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port)]
            + [str(SCRIPT), str(runs), "nodes"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    one, nodes = torch.load(runs / "sft-1.pt"), torch.load(runs / "sft-nodes.pt")
    assert nodes["world_size"] == 2 and nodes["strategy"] == "FSDP2Strategy"  # Trainer(strategy="fsdp2")
    assert nodes["losses"] == pytest.approx(one["losses"], rel=1e-4, abs=1e-6)
    moved = sum((w - one["initial"][n]).abs().sum() for n, w in one["weights"].items())
    apart = sum((nodes["weights"][n] - w).abs().sum() for n, w in one["weights"].items())
    assert apart <= 1e-3 * moved


def test_fsdp2_names_model_parallel_over_every_process_without_tensor_parallelism():
    import lightning as L

    from lightning_align import FSDP2Strategy

    fit = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy="fsdp2", logger=False)
    assert isinstance(fit.strategy, FSDP2Strategy)
    assert fit.strategy._tensor_parallel_size == 1 and fit.strategy._data_parallel_size == "auto"  # all, at launch
