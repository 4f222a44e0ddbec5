"""The memory planner: each part of its breakdown against arithmetic done here, the depth shortcut against the full
build, the CLI on the example configs and on published 7B / 70B configurations, and the end-of-training report."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_align import plan as planner
from lightning_align.plan import RunSpec, nf4_bytes, parse_bytes, plan_run, spec_from_config

FIXTURES = Path(__file__).parent / "fixtures"
CONFIGS = Path(__file__).parent.parent / "examples" / "configs"


@pytest.fixture(scope="module")
def llama_config(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("plan-llama")
    LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4
    ).save_pretrained(folder)
    return str(folder)


def parameter_count(config_folder: str) -> tuple[int, int, int]:
    """(parameters, parameter tensors, buffer bytes) of the model, built for real here."""
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(config_folder))
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return sum(p.numel() for p in model.parameters()), len(list(model.parameters())), buffers


def test_episodes_plan_their_whole_length(llama_config, tmp_path):
    from lightning_align.plan.spec import episode_tokens

    one_turn = plan_run(RunSpec(llama_config, method="grpo", micro_batch=2, max_length=16, max_new_tokens=16))
    episodes = plan_run(dataclasses.replace(one_turn.spec, episode_tokens=128))
    assert episodes.parts["activations"] > 2 * one_turn.parts["activations"]
    environment = "lightning_align.environments.ToolEnvironment"
    assert episode_tokens({"class_path": environment}) == 512  # its default
    assert episode_tokens({"class_path": environment, "init_args": {"max_tokens": 64}}) == 64
    assert episode_tokens(None) is None
    with pytest.raises(ValueError, match="environment.class_path 'nowhere.Env'"):
        episode_tokens({"class_path": "nowhere.Env"})


def test_full_training_holds_weights_gradients_and_two_adamw_moments(llama_config):
    n, tensors, buffers = parameter_count(llama_config)
    # A batch small enough that the peak is in the backward pass, where the gradients exist (the step drops them,
    # so the forward holds none): all but the embeddings', computed last.
    plan = plan_run(RunSpec(llama_config, method="sft", micro_batch=1, max_length=4))
    assert plan.total_params == plan.trainable_params == n
    assert plan.parts["weights"] == 4 * n + buffers  # the rotary frequencies are a buffer
    assert 0 < plan.parts["gradients"] <= 4 * n
    # exp_avg and exp_avg_sq per weight, and fused AdamW's step count: one float32 per tensor.
    assert plan.parts["optimizer states (AdamW)"] == 8 * n + 4 * tensors
    assert plan.parts["activations"] > 0
    # Never less than the optimiser step's own moment: weights, every gradient, the moments (fused: no temporary).
    assert plan.peak >= plan.parts["weights"] + 4 * n + plan.parts["optimizer states (AdamW)"]


def test_bf16_weights_halve_the_weights_and_adamw_states(llama_config):
    fp32 = plan_run(RunSpec(llama_config, method="sft", micro_batch=2, max_length=32))
    bf16 = plan_run(RunSpec(llama_config, method="sft", micro_batch=2, max_length=32, precision="bf16-true"))
    _, tensors, buffers = parameter_count(llama_config)
    assert (bf16.parts["weights"] - buffers) * 2 == fp32.parts["weights"] - buffers  # buffers stay float32
    steps = 4 * tensors  # fused AdamW's step counts stay float32
    assert (bf16.parts["optimizer states (AdamW)"] - steps) * 2 == fp32.parts["optimizer states (AdamW)"] - steps
    assert bf16.weights_by_dtype == {"bfloat16": (fp32.parts["weights"] - buffers) // 2}


def test_lora_trains_and_keeps_states_for_the_adapter_only(llama_config):
    n, _, _ = parameter_count(llama_config)
    plan = plan_run(RunSpec(llama_config, method="dpo", adapter="lora", r=4, micro_batch=2, max_length=32))
    # Every linear layer of the blocks gets A [r, in] and B [out, r]: q, k, v, o (64 -> 64), gate, up (64 -> 128),
    # down (128 -> 64), in each of 6 layers.
    adapter = 6 * 4 * (4 * (64 + 64) + 2 * (64 + 128) + (128 + 64))
    assert plan.trainable_params == adapter and plan.total_params == n + adapter
    assert plan.parts["gradients"] in (0, 4 * adapter)  # 0 where the peak is the first batch's check
    assert "reference model (frozen copy)" not in plan.parts  # the adapter-disabled policy is the reference


def test_nf4_bytes_are_what_bitsandbytes_stores():
    import bitsandbytes as bnb

    for shape, double_quant in [((256, 192), True), ((256, 192), False), ((1000, 64), True)]:
        weight = torch.randn(shape, dtype=torch.bfloat16)
        packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=double_quant)
        stored = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if double_quant:
            stored += state.state2.absmax.numel() * state.state2.absmax.element_size()
        assert nf4_bytes(weight.numel(), double_quant) == stored


def test_qlora_counts_the_body_in_nf4_and_the_rest_in_float32(llama_config):
    plan = plan_run(RunSpec(llama_config, method="sft", adapter="qlora", r=4, micro_batch=2, max_length=32))
    body = 6 * (4 * 64 * 64 + 3 * 64 * 128)
    assert plan.weights_by_dtype["nf4 (double quant)"] == sum(
        nf4_bytes(n, True) for n in [64 * 64] * 24 + [64 * 128] * 18
    )
    n, _, _ = parameter_count(llama_config)
    adapter = plan.trainable_params
    assert plan.weights_by_dtype["float32"] == 4 * (n - body + adapter)


def test_checkpointing_full_and_selective_shrink_activations_and_the_batch_grows_them(llama_config):
    spec = RunSpec(llama_config, method="sft", micro_batch=4, max_length=128, scoring_check="off")
    plain = plan_run(spec).parts["activations"]
    checkpointed = plan_run(dataclasses.replace(spec, gradient_checkpointing=True)).parts["activations (checkpointed)"]
    selective = plan_run(dataclasses.replace(spec, gradient_checkpointing="selective"))
    doubled = plan_run(dataclasses.replace(spec, micro_batch=8)).parts["activations"]
    assert checkpointed < 0.6 * plain
    # Keeping what matrix products and attention computed holds more than full checkpointing, far less than none.
    assert checkpointed < selective.parts["activations (checkpointed)"] < 0.8 * plain
    assert "selective gradient checkpointing" in selective.spec.describe()
    assert 1.6 * plain < doubled < 2.2 * plain


def test_a_full_dpo_reference_is_a_frozen_copy_unless_precomputed(llama_config):
    n, _, _ = parameter_count(llama_config)
    spec = RunSpec(llama_config, method="dpo", micro_batch=2, max_length=32)
    assert plan_run(spec).parts["reference model (frozen copy)"] == 4 * n
    assert "reference model (frozen copy)" not in plan_run(dataclasses.replace(spec, precompute_ref_logps=True)).parts
    assert "reference model (frozen copy)" not in plan_run(dataclasses.replace(spec, uses_reference=False)).parts


def test_sharding_divides_what_each_strategy_shards(llama_config):
    spec = RunSpec(llama_config, method="sft", micro_batch=2, max_length=32, scoring_check="off")
    one = plan_run(spec).parts
    fsdp = plan_run(dataclasses.replace(spec, strategy="fsdp", devices=4)).parts
    zero2 = plan_run(dataclasses.replace(spec, strategy="deepspeed_stage_2", devices=4)).parts
    ddp = plan_run(dataclasses.replace(spec, strategy="ddp", devices=4)).parts
    for part in ("gradients", "optimizer states (AdamW)"):
        assert fsdp[part] == one[part] // 4 and zero2[part] == one[part] // 4
    assert fsdp["weights"] == one["weights"] // 4 and zero2["weights"] == one["weights"]
    assert ddp["weights"] == one["weights"] and ddp["DDP gradient buckets"] == one["gradients"]


def test_fsdp_shards_the_reference_copy_and_holds_the_root_and_two_layers_whole(llama_config):
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(llama_config))  # small: counted for real
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())  # float32 bytes
    root = 4 * sum(p.numel() for p in model.parameters()) - len(model.model.layers) * layer
    spec = RunSpec(llama_config, method="dpo", micro_batch=2, max_length=32, scoring_check="off")
    one = plan_run(spec).parts
    fsdp = plan_run(dataclasses.replace(spec, strategy="fsdp", devices=4)).parts
    assert fsdp["reference model (frozen copy)"] == one["reference model (frozen copy)"] // 4
    assert fsdp["gathered whole while computing"] == root + 2 * layer
    assert "gathered whole while computing" not in one


def test_fsdp_plans_the_largest_moment_of_the_step_and_set_up_apart(tmp_path):
    # A large vocabulary makes the root (embeddings, output layer) most of the model, as in the 20M benchmark rows.
    config = LlamaConfig(
        vocab_size=32_000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    config.save_pretrained(tmp_path)
    model = LlamaForCausalLM(config)
    layer = 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    root = 4 * sum(p.numel() for p in model.parameters()) - 2 * layer
    spec = RunSpec(str(tmp_path), method="sft", micro_batch=2, max_length=8, scoring_check="off")
    sharded = dataclasses.replace(spec, strategy="fsdp", devices=2)
    for accelerator, copies in (("cuda", 2), ("cpu", 3)):  # gloo adds a temporary copy to the reduce-scatter
        plan = plan_run(dataclasses.replace(sharded, accelerator=accelerator))
        assert plan.parts["gathered whole while computing"] == copies * root  # whole gradients, their copies
        assert plan.parts["gradients"] == (root + 2 * layer) // 2  # every shard's gradient, at that moment
        assert plan.parts["activations"] == 0
        assert plan.peak == sum(plan.parts.values())
        assert plan.setup == (root + 2 * layer) + (root + 2 * layer) // 2  # host memory: whole model, then the shard
        assert any("reducing the root's gradients" in note for note in plan.notes)
    lora = plan_run(dataclasses.replace(sharded, method="ppo", adapter="lora", max_new_tokens=8))
    assert lora.parts["gathered whole while computing"] == 2 * root  # sampling: the whole policy, root first
    assert any("peak is while sampling" in note for note in lora.notes)


def test_the_depth_shortcut_equals_building_every_layer(llama_config, monkeypatch):
    for spec in [
        RunSpec(llama_config, method="sft", micro_batch=2, max_length=64),
        RunSpec(llama_config, method="dpo", adapter="lora", micro_batch=2, max_length=64, gradient_checkpointing=True),
        RunSpec(llama_config, method="kto", adapter="qlora", micro_batch=2, max_length=64),
        RunSpec(llama_config, method="reward", adapter="lora", micro_batch=2, max_length=64, precision="bf16-mixed"),
    ]:
        shortcut = plan_run(spec)
        assert any("measured at 2, 3, 4 layers" in note for note in shortcut.notes)
        monkeypatch.setattr(planner.step, "SHALLOW_DEPTHS", (10, 11, 12))  # deeper than the model: every layer is built
        full = plan_run(spec)
        monkeypatch.undo()
        assert shortcut.parts == full.parts and shortcut.total_params == full.total_params


def test_layers_of_different_kinds_are_built_in_full(llama_config):
    config = LlamaConfig.from_pretrained(llama_config)
    assert planner.uniform_layers(config)
    config.layer_types = ["sliding_attention", "full_attention"] * 3
    assert not planner.uniform_layers(config)


def test_spec_from_the_example_configs():
    spec = spec_from_config(CONFIGS / "dpo_qlora.yaml")
    assert (spec.method, spec.adapter, spec.r, spec.micro_batch, spec.max_length) == ("dpo", "qlora", 8, 16, 64)
    assert spec.uses_reference and spec.double_quant and spec.compute_dtype == "bfloat16"
    assert not spec_from_config(CONFIGS / "orpo_full.yaml").uses_reference
    grpo = spec_from_config(CONFIGS / "grpo_lora.yaml")
    assert grpo.method == "grpo" and grpo.adapter == "lora"
    # Multi-turn episodes: a row holds every turn of an episode, the environment's tokens too (max_tokens).
    tools = spec_from_config(CONFIGS / "grpo_tools.yaml")
    assert (tools.max_new_tokens, tools.episode_tokens, tools.sequence) == (96, 256, 64 + 256)
    assert "256 per episode" in tools.describe()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        plan_run(spec_from_config(CONFIGS / "sft_full.yaml", model=str(CONFIGS)))


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24G") == 24 * 2**30
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")


def test_cli_plans_the_example_config_and_the_published_7b_and_70b(capsys):
    from lightning_align.cli import main

    main(["plan", "--config", str(CONFIGS / "dpo_qlora.yaml"), "--device-memory", "24GiB"])
    out = capsys.readouterr().out
    assert "plan for dpo, qlora r=8" in out and "optimizer states (AdamW)" in out and "fits a 24.00 GiB device" in out
    main(
        [
            "plan",
            "--config",
            str(CONFIGS / "sft_full.yaml"),
            "--model",
            str(FIXTURES / "llama-2-7b"),
            "--max-length",
            "512",
            "--micro-batch",
            "1",
            "--precision",
            "bf16-true",
            "--device-memory",
            "24GiB",
        ]
    )
    out = capsys.readouterr().out
    assert "parameters: 6,738,415,616" in out  # Llama-2-7B's published count
    assert "does NOT fit a 24.00 GiB device" in out and "cheapest change that fits: " in out
    main(
        [
            "plan",
            "--config",
            str(CONFIGS / "sft_qlora.yaml"),
            "--model",
            str(FIXTURES / "llama-2-70b" / "config.json"),
            "--max-length",
            "512",
            "--micro-batch",
            "1",
            "--gradient-checkpointing",
            "--device-memory",
            "80GB",
        ]
    )
    out = capsys.readouterr().out
    total, trainable = (
        int(n.replace(",", "")) for n in re.search(r"parameters: ([\d,]+) \(([\d,]+) trainable", out).groups()
    )
    assert total - trainable == 68_976_648_192  # Llama-2-70B's published count, plus the adapter
    assert "fits a 74.51 GiB device" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{bad}/config.json"], "config.json: not a valid JSON model config (Expecting property name"),
        (["--model", "{bad}"], "config.json: not a valid JSON model config"),
        (["--micro-batch", "-1"], "argument --micro-batch: must be at least 1, got -1"),
        (["--max-length", "0"], "argument --max-length: must be at least 2, got 0"),
        (["--device-memory", "0"], "device memory '0': must be more than 0"),
    ],
    ids=["bad-json-file", "bad-json-folder", "negative-micro-batch", "zero-length", "zero-memory"],
)
def test_cli_plan_input_errors_name_the_cause_in_one_line(args, message, tmp_path, capsys):
    from lightning_align.cli import main

    (tmp_path / "config.json").write_text('{"model_type": "llama",\n')
    args = [a.replace("{bad}", str(tmp_path)) for a in args]
    with pytest.raises(SystemExit) as stop:
        main(["plan", "--config", str(CONFIGS / "sft_full.yaml"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and message in err[-1] and "Traceback" not in "\n".join(err)


def test_cheapest_change_is_one_that_fits(llama_config):
    spec = RunSpec(llama_config, method="sft", micro_batch=8, max_length=256)
    needed = plan_run(spec).device_total()
    found = planner.cheapest_fit(spec, needed - 1)
    assert found is not None
    what, fitting = found
    assert fitting.device_total() <= needed - 1 and what


def test_memory_report_logs_the_plan_next_to_the_measured_peak(tiny_model, task_files, tmp_path):
    import lightning as L

    from lightning_align import LoRA, MemoryReport, SFTDataModule, SFTModule

    class Metrics(L.pytorch.loggers.logger.DummyLogger):
        def __init__(self):
            super().__init__()
            self.logged = {}

        def log_metrics(self, metrics, step=None):
            self.logged.update(metrics)

    logger, report = Metrics(), MemoryReport()
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4, max_length=48)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=logger,
        callbacks=[report, LoRA(r=4)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(SFTModule(tiny_model), datamodule=dm)
    spec = report.plan.spec
    assert (spec.method, spec.adapter, spec.r, spec.micro_batch, spec.max_length) == ("sft", "lora", 4, 4, 48)
    assert logger.logged["memory/planned_gib"] == pytest.approx(report.plan.peak / 2**30)
    assert logger.logged["memory/measured_gib"] > 0
    assert math.isfinite(logger.logged["memory/measured_gib"])


def test_gpu_check_says_it_skipped_without_cuda(monkeypatch, capsys):
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_check"])
    gpu_check.main()
    assert "no CUDA device visible to this torch build; skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    "method, module_class",
    [
        ("sft", "SFTModule"),
        ("dpo", "DPOModule"),
        ("kto", "KTOModule"),
        ("reward", "RewardModule"),
        ("grpo", "GRPOModule"),
    ],
)
def test_the_planner_runs_the_modules_own_step(llama_config, monkeypatch, method, module_class):
    # No copy of the step in the planner: a module whose step holds 32 MiB more until its backward is planned
    # with them, without any change to the planner.
    import lightning_align.modules as modules

    spec = RunSpec(llama_config, method=method, micro_batch=2, max_length=32, scoring_check="off")
    before = plan_run(spec)
    cls = getattr(modules, module_class)
    own = cls.step_loss
    extra = 32 * 2**20

    def holding_more(self, batch):
        held = torch.zeros(extra // 4)  # kept for the backward of the product below
        return (own(self, batch) * held).mean()

    monkeypatch.setattr(cls, "step_loss", holding_more)
    after = plan_run(spec)
    assert after.peak - before.peak >= extra
    assert after.parts["weights"] == before.parts["weights"]
