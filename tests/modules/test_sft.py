"""SFTModule: the loss it trains on, what it logs, that it learns a task, and its export."""

import json

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_align import SFTDataModule, SFTModule
from lightning_align.data.collate import pad_collate
from lightning_align.demos import task_accuracy
from tests.conftest import TEST_SEED, report_gain, trainer


def test_completion_only_loss_equals_hand_computation(tiny_model, task_files):
    from transformers import AutoModelForCausalLM

    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = SFTModule(AutoModelForCausalLM.from_pretrained(tiny_model))
    module.configure_model()
    loss = module.loss(batch)

    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            label = batch["labels"][b, t].item()
            if label == -100:
                continue
            scores = logits[b, t - 1]
            total -= (scores[label] - torch.log(torch.exp(scores).sum())).item()
            count += 1
    prompt_tokens = int((batch["labels"] == -100).logical_and(batch["attention_mask"] == 1).sum())
    assert prompt_tokens > 0 and count < int(batch["attention_mask"].sum())  # the prompt really is left out
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_trains_from_a_plain_dataloader_of_hugging_face_dicts(tiny_model, tokenizer, tmp_path):
    examples = []
    for text in ["sort: 321\n123", "add: 2+2\n4", "reverse: abc\ncba"] * 8:
        ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
        examples.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    loader = DataLoader(examples, batch_size=6, collate_fn=lambda rows: pad_collate(rows, tokenizer.pad_token_id))
    module = SFTModule(tiny_model, learning_rate=3e-3)
    module.configure_model()
    batch = next(iter(loader))
    with torch.no_grad():
        before = module.loss(batch).item()
    trainer(tmp_path, max_epochs=6).fit(module, train_dataloaders=loader)
    with torch.no_grad():
        after = module.loss(batch).item()
    assert after < before * 0.6


def test_val_loss_is_token_weighted_over_the_whole_set_and_perplexity_its_exp(tiny_model, task_files, tmp_path):
    dm = SFTDataModule(tiny_model, task_files["sft_train"], task_files["sft_val"], batch_size=16)
    module = SFTModule(tiny_model)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=3)
    fit.validate(module, datamodule=dm)
    metrics = fit.callback_metrics
    nll, tokens = 0.0, 0
    for i, batch in enumerate(dm.val_dataloader()):
        if i == 3:
            break
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = torch.log_softmax(logits[:, :-1].double(), -1)
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        nll -= logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask].sum().item()
        tokens += int(mask.sum())
    assert metrics["val/loss"].item() == pytest.approx(nll / tokens, rel=1e-5)
    assert metrics["val/perplexity"].item() == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-5)


@pytest.mark.slow
@pytest.mark.learning
def test_sft_raises_heldout_task_accuracy(tiny_model, tokenizer, plain_task_files, tmp_path):
    import lightning as L

    L.seed_everything(TEST_SEED)  # the tiny model's learning curve has a sharp step whose timing depends on the seed
    prompts = [json.loads(line)["prompt"] for line in open(plain_task_files["sft_val"])][:150]
    dm = SFTDataModule(
        tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=32, max_length=64
    )
    module = SFTModule(tiny_model, learning_rate=3e-3, warmup_steps=30)
    fit = trainer(tmp_path, max_steps=1200, limit_val_batches=2, val_check_interval=400, check_val_every_n_epoch=None)
    module.configure_model()
    before = task_accuracy(module.model, tokenizer, prompts)
    fit.fit(module, datamodule=dm)
    after = task_accuracy(module.model, tokenizer, prompts)
    report_gain(before, after)
    assert before < 0.05 and after > before + 0.3
    assert fit.callback_metrics["train/tokens_per_sec"] > 0


def test_save_pretrained_writes_a_folder_that_from_pretrained_loads(tiny_model, tmp_path, task_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=8)
    module = SFTModule(tiny_model, learning_rate=1e-3)
    trainer(tmp_path, max_steps=3).fit(module, datamodule=dm)
    module.save_pretrained(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    AutoTokenizer.from_pretrained(tmp_path / "export")
    ids = torch.tensor([[1, 30, 31, 32]])
    torch.testing.assert_close(loaded(ids).logits, module.model.eval()(ids).logits)


def test_missing_model_path_is_a_clear_error(tmp_path):
    module = SFTModule(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="no-such-model' could not be loaded"):
        module.configure_model()


def test_validate_before_fit_then_validation_during_fit_works(tiny_model, task_files, tmp_path):
    dm = SFTDataModule(tiny_model, task_files["sft_train"], task_files["sft_val"], batch_size=16)
    module = SFTModule(tiny_model, learning_rate=3e-3)
    fit = trainer(tmp_path, max_steps=4, limit_val_batches=2, val_check_interval=2, check_val_every_n_epoch=None)
    fit.validate(module, datamodule=dm)
    before = fit.callback_metrics["val/loss"].item()
    fit.fit(module, datamodule=dm)
    assert fit.callback_metrics["val/loss"].item() < before


def test_loaded_model_is_in_train_mode_so_dropout_applies(tiny_model):
    module = SFTModule(tiny_model)
    module.configure_model()
    assert all(m.training for m in module.model.modules())


class GradientRecordingSFT(SFTModule):
    """Records the gradients the optimiser is about to apply at its first step (after the module's own rescale)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        if not hasattr(self, "first_step_grads"):
            self.first_step_grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_the_larger_batch_with_unequal_response_lengths(tiny_model, tokenizer, tmp_path):
    from lightning_align.data.collate import pad_collate

    rows = [("sort: 9\n", "9"), ("reverse: abcdefghij\n", "jihgfedcba"), ("add: 1+1\n", "2"), ("sort: 4321\n", "1234")]
    examples = []
    for prompt, completion in rows:
        ids = tokenizer(prompt).input_ids
        reply = tokenizer(completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        examples.append({"input_ids": ids + reply, "labels": [-100] * len(ids) + reply})
    pad = tokenizer.pad_token_id
    micro = [pad_collate(examples[:2], pad), pad_collate(examples[2:], pad)]  # 1 + 10 vs 1 + 4 scored tokens
    whole = [pad_collate(examples, pad)]

    def first_step_grads(batches, accumulate):
        module = GradientRecordingSFT(tiny_model, learning_rate=1e-3)
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        trainer(tmp_path, max_steps=1, accumulate_grad_batches=accumulate).fit(module, train_dataloaders=loader)
        return module.first_step_grads

    accumulated, together = first_step_grads(micro, 2), first_step_grads(whole, 1)
    assert accumulated.keys() == together.keys() and len(together) > 10
    for name, grad in together.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # A per-micro-batch mean would weigh the two micro-batches' tokens unequally: measurably different gradients.
    module = SFTModule(tiny_model)
    module.configure_model()
    per_batch_mean = sum(module.loss(b) for b in micro) / 2
    per_batch_mean.backward()
    name = next(iter(together))
    naive = dict(module.named_parameters())[name].grad
    assert not torch.allclose(naive, together[name], rtol=1e-3)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_loss_from_scored_positions_only_equals_the_full_logits_loss(
    tiny_model, plain_task_files, tmp_path, packing, adapter
):
    from lightning_align import LoRA
    from lightning_align.scoring.plan import ScoringPlan
    from tests.conftest import ready

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=6, max_length=64, packing=packing)
    dm.setup("fit")
    batch = dm.collate(dm.train_set[:6])
    module = ready(SFTModule(tiny_model), [LoRA(r=4)] if adapter else [], tmp_path)
    assert module.scoring_plan(batch) == ScoringPlan("one_row", "chunked")  # the fast path is the one taken
    fast = module.scored_loss(batch)
    (2 * fast).backward()
    fast_grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad()
    plain = module.loss(batch)
    (2 * plain).backward()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    plain_grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 4
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_adamw_is_fused_and_clipped_under_every_precision(tiny_model, plain_task_files, tmp_path, precision):
    from tests.conftest import trainer

    norms = []

    def record(optimizer, args, kwargs):  # the gradients the step used (its closure computes them)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))

    class Norms(L.Callback):
        def on_train_start(self, trainer, module):
            trainer.optimizers[0].register_step_post_hook(record)

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=64)
    fit = trainer(tmp_path, max_steps=2, precision=precision, gradient_clip_val=0.05, callbacks=[Norms()])
    fit.fit(SFTModule(tiny_model), datamodule=dm)
    assert fit.optimizers[0].defaults["fused"] is True
    assert len(norms) == 2 and all(0 < norm <= 0.05 + 1e-6 for norm in norms)  # clipped (unscaled under 16-mixed)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adamw_steps_equal_the_foreach_implementation(
    tiny_model, plain_task_files, tmp_path, monkeypatch, precision
):
    class ForeachAdamW(torch.optim.AdamW):
        def __init__(self, *args, fused=None, **kwargs):
            super().__init__(*args, **kwargs)

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=64)
    weights = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(torch.optim, "AdamW", ForeachAdamW)
        torch.manual_seed(0)
        module = SFTModule(tiny_model, learning_rate=1e-3)
        fit = trainer(tmp_path / str(fused), max_steps=3, precision=precision, gradient_clip_val=0.5)
        fit.fit(module, datamodule=dm)
        assert bool(fit.optimizers[0].param_groups[0]["fused"]) is fused
        weights[fused] = {n: p.detach().clone() for n, p in module.named_parameters()}
    for name, weight in weights[False].items():
        torch.testing.assert_close(weights[True][name], weight, rtol=1e-5, atol=1e-6, msg=name)
