"""LoRA and QLoRA callbacks: parameter counts, frozen base, save / reload / merge, precisions."""

import pytest
import torch
from torch import nn

from lightning_align import LoRA, QLoRA, SFTDataModule, SFTModule
from tests.conftest import TEST_SEED, report_gain, trainer

IDS = torch.tensor([[1, 30, 31, 32, 40, 41], [1, 50, 51, 52, 53, 54]])


def fit_sft(tiny_model, plain_task_files, tmp_path, adapter, steps=20, learning_rate=1e-2, **trainer_args):
    dm = SFTDataModule(
        tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=16, max_length=64
    )
    module = SFTModule(tiny_model, learning_rate=learning_rate)
    fit = trainer(tmp_path, max_steps=steps, callbacks=[adapter], limit_val_batches=2, **trainer_args)
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    return module, fit


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_trainable_count_is_r_times_in_plus_out_over_all_targeted_linears(tiny_model):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    targeted = [m for name, m in base.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in name]
    expected = sum(4 * (m.in_features + m.out_features) for m in targeted)
    lora = LoRA(r=4)
    module = SFTModule(base)
    module.configure_model()
    model = lora.adapt(module.model, module)
    assert lora.trainable_params == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert len(targeted) == 4 * 7  # q k v o gate up down in each of 4 layers


def test_lora_trains_adapter_only_and_save_reload_merge_keep_the_logits(tiny_model, plain_task_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_before = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(tiny_model).state_dict().items()}
    module, fit = fit_sft(tiny_model, plain_task_files, tmp_path, LoRA(r=4, merge_on_save=True))
    base_after = module.model.get_base_model().state_dict()
    for name, weight in base_before.items():
        peft_name = name.replace(".weight", ".base_layer.weight") if "proj" in name else name
        assert torch.equal(base_after[peft_name], weight), name  # bit-identical frozen base
    trained = logits(module.model)
    assert not torch.allclose(trained, logits(AutoModelForCausalLM.from_pretrained(tiny_model)))

    adapter_dir = tmp_path / "adapter"  # saved at the end of training
    assert (adapter_dir / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter_dir)
    assert torch.equal(logits(reloaded), trained)

    merged = AutoModelForCausalLM.from_pretrained(adapter_dir / "merged")
    assert not any("lora" in name for name in merged.state_dict())
    torch.testing.assert_close(logits(merged), trained, atol=1e-5, rtol=1e-5)


def test_lora_saves_the_adapter_with_each_checkpoint(tiny_model, plain_task_files, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=8)
    fit = trainer(tmp_path, max_steps=4, callbacks=[LoRA(r=4), ckpt], enable_checkpointing=True)
    fit.fit(SFTModule(tiny_model), datamodule=dm)
    assert (tmp_path / "ckpt" / "adapter-step-2" / "adapter_model.safetensors").exists()  # beside the checkpoints
    assert (tmp_path / "ckpt" / "adapter-step-4" / "adapter_model.safetensors").exists()
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    assert checkpoint["adapter_config"]["r"] == 4


@pytest.mark.learning
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_lora_runs_and_learns_under_bf16(tiny_model, plain_task_files, tmp_path, precision):
    torch.manual_seed(TEST_SEED)  # the adapter's initialisation
    dm = SFTDataModule(
        tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=16, max_length=64
    )
    module = SFTModule(tiny_model, learning_rate=1e-2)
    fit = trainer(tmp_path, max_steps=30, callbacks=[LoRA(r=8)], limit_val_batches=2, precision=precision)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/loss"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = fit.callback_metrics["val/loss"].item()
    report_gain(before, after)
    assert after < before - 0.5, (before, after)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert module.model.get_base_model().model.layers[0].mlp.up_proj.lora_A["default"].weight.dtype == expected


@pytest.mark.learning
def test_qlora_quantises_targeted_linears_to_4bit_and_trains(tiny_model, plain_task_files, tmp_path):
    import bitsandbytes as bnb

    torch.manual_seed(TEST_SEED)

    dm = SFTDataModule(
        tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=16, max_length=64
    )
    module = SFTModule(tiny_model, learning_rate=1e-2)
    fit = trainer(tmp_path, max_steps=30, callbacks=[QLoRA(r=8, merge_on_save=True)], limit_val_batches=2)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/loss"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = fit.callback_metrics["val/loss"].item()
    base = module.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    report_gain(before, after)
    assert after < before - 0.5, (before, after)
    return module


def test_qlora_adapter_reloads_and_merges_into_a_full_precision_base(tiny_model, plain_task_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    module = test_qlora_quantises_targeted_linears_to_4bit_and_trains(tiny_model, plain_task_files, tmp_path)
    trained = logits(module.model)
    quantised = AutoModelForCausalLM.from_pretrained(
        tiny_model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        device_map="cpu",
    )
    reloaded = PeftModel.from_pretrained(quantised, tmp_path / "adapter")
    # Matrix products run in bfloat16 (8 significant bits): equal up to its rounding. On some CPUs a few logits
    # land one or two bfloat16 steps (2**-8 of the largest logit) apart; the mean difference stays far below one.
    step = 2**-8 * trained.abs().max()
    difference = (logits(reloaded) - trained).abs()
    assert difference.max() <= 4 * step and difference.mean() <= step / 16, (difference.max(), difference.mean(), step)
    with reloaded.disable_adapter():  # what a lost adapter would give: far outside that rounding
        assert (logits(reloaded) - trained).abs().max() > 10 * difference.max()

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "merged")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    full_base = AutoModelForCausalLM.from_pretrained(tiny_model)
    full_plus_adapter = PeftModel.from_pretrained(full_base, tmp_path / "adapter")
    torch.testing.assert_close(logits(merged), logits(full_plus_adapter), atol=1e-5, rtol=1e-5)
    # Against the 4-bit model only the quantisation error remains: small next to the logits' spread.
    assert (logits(merged) - trained).abs().mean() < 0.1 * trained.std()


def test_qlora_needs_a_model_path():
    module = SFTModule(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="give the module a model name or folder"):
        QLoRA().load_kwargs(module)


def test_gradient_checkpointing_with_lora_still_trains_the_adapter(tiny_model, plain_task_files, tmp_path):
    from tests.modules.test_sft import GradientRecordingSFT

    dm = SFTDataModule(
        tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=16, max_length=64
    )
    module = GradientRecordingSFT(tiny_model, learning_rate=1e-2, gradient_checkpointing=True)
    fit = trainer(tmp_path, max_steps=20, limit_val_batches=2, callbacks=[LoRA(r=4)])
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/loss"].item()
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    assert module.model.base_model.model.is_gradient_checkpointing
    lora_b = {n: g for n, g in module.first_step_grads.items() if "lora_B" in n}
    assert len(lora_b) == 28 and all(g.abs().sum() > 0 for g in lora_b.values())  # every adapted layer learns
    assert fit.callback_metrics["val/loss"].item() < before - 0.3
