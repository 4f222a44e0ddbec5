"""DPOModule: reference selection, precomputed reference log-probs, loss at the start, learning."""

import json
import math

import pytest
import torch

from lightning_align import DPOModule, LoRA, PreferenceDataModule
from lightning_align.losses import DPO_LOSS_TYPES
from lightning_align.modules.dpo import chosen_rejected_logps
from tests.conftest import TEST_SEED, report_gain, trainer


def preference_data(model_path, task_files, batch_size=8):
    dm = PreferenceDataModule(
        model_path, task_files["preference_train"], task_files["preference_val"], batch_size=batch_size, max_length=64
    )
    dm.setup("fit")
    return dm


def base_logps(model_path, batch):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return chosen_rejected_logps(AutoModelForCausalLM.from_pretrained(model_path).eval(), batch)


def test_unknown_loss_type_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown loss_type 'dpop'; valid: sigmoid, ipo, .*, simpo, orpo, sft"):
        DPOModule("any", loss_type="dpop")


def test_lora_reference_is_the_adapter_disabled_base_and_stays_constant(sft_model, task_files, tmp_path):
    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.val_set[:8])
    module = DPOModule(sft_model, learning_rate=1e-2)
    fit = trainer(tmp_path, max_steps=10, callbacks=[LoRA(r=4)])
    fit.fit(module, datamodule=dm)
    assert module.reference.kind == "adapter-disabled base" and module.reference.network is None
    expected = base_logps(sft_model, batch)
    after = module.reference_logps(batch)
    for ours, ref in zip(after, expected):
        torch.testing.assert_close(ours, ref)
    with torch.no_grad():
        policy = chosen_rejected_logps(module.model.eval(), batch)
    assert not torch.allclose(policy[0], expected[0])  # the policy did move
    # One copy of the base weights: every stored tensor is distinct and no frozen network exists beside them.
    pointers = [p.data_ptr() for p in module.model.parameters()]
    assert len(pointers) == len(set(pointers))
    assert sum(p.numel() for p in module.parameters()) == module.model.get_base_model().num_parameters()


def test_full_finetuning_reference_is_a_frozen_copy_and_first_sigmoid_loss_is_log_2(sft_model, task_files, tmp_path):
    dm = preference_data(sft_model, task_files)
    module = DPOModule(sft_model)
    module.configure_model()
    module.reference.to(module.model)
    assert module.reference.kind == "frozen copy of the starting policy"
    assert all(not p.requires_grad for p in module.reference.network.parameters())
    metrics = module.preference_step(dm.collate(dm.train_set[:8]))
    torch.testing.assert_close(metrics["loss"], torch.full((8,), math.log(2)))
    assert "reference" not in "".join(module.state_dict())  # checkpoints hold the policy only


def test_precomputed_reference_gives_the_same_first_loss_and_releases_the_network(sft_model, task_files, tmp_path):
    dm = preference_data(sft_model, task_files)
    live = DPOModule(sft_model)
    live.configure_model()
    live.reference.to(live.model)
    torch.manual_seed(0)
    for p in live.model.parameters():  # a policy away from the reference, so the loss is not log 2
        p.data.add_(0.01 * torch.randn_like(p))
    perturbed = {k: v.clone() for k, v in live.model.state_dict().items()}

    pre = DPOModule(sft_model, precompute_ref_logps=True, learning_rate=0.0)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(pre, datamodule=dm)
    assert pre.reference is None
    assert all("ref_chosen_logps" in e for e in dm.train_set + dm.val_set)
    pre.model.load_state_dict(perturbed)
    batch = dm.collate(dm.train_set[:8])
    assert "ref_chosen_logps" in batch
    with torch.no_grad():
        torch.testing.assert_close(pre.preference_step(batch)["loss"], live.preference_step(batch)["loss"])


def chosen_rate(model, tokenizer, task_files) -> float:
    """Share of held-out prompts whose greedy answer is exactly the chosen response (the bare right answer)."""
    from lightning_align.demos import task_accuracy

    prompts = [json.loads(line)["prompt"] for line in open(task_files["preference_val"])]
    return task_accuracy(model, tokenizer, prompts)


@pytest.mark.slow
@pytest.mark.learning
def test_dpo_raises_heldout_reward_accuracy_and_the_greedy_chosen_rate(sft_model, task_files, tmp_path):
    import lightning as L

    L.seed_everything(TEST_SEED)
    dm = preference_data(sft_model, task_files, batch_size=16)
    # rpo_alpha keeps the chosen answers likely while the verbose style is pushed down (Pang et al. 2024).
    module = DPOModule(sft_model, beta=0.1, learning_rate=1e-4, warmup_steps=10, rpo_alpha=1.0)
    fit = trainer(tmp_path, max_steps=150)
    fit.validate(module, datamodule=dm)
    before = {k: v.item() for k, v in fit.callback_metrics.items()}
    rate_before = chosen_rate(module.model, dm.tokenizer, task_files)
    fit.fit(module, datamodule=dm)
    fit.validate(module, datamodule=dm)
    after = {k: v.item() for k, v in fit.callback_metrics.items()}
    rate_after = chosen_rate(module.model, dm.tokenizer, task_files)
    report_gain(rate_before, rate_after, f"accuracy {after['val/rewards/accuracies']:.3f}")
    assert before["val/rewards/accuracies"] == 0  # policy == reference: no pair is ranked yet
    assert after["val/rewards/accuracies"] > 0.7 and after["val/rewards/margins"] > 0
    assert rate_after > rate_before + 0.08 and rate_after > 1.5 * rate_before


@pytest.mark.parametrize("nll_average", ["tokens", "responses"])
def test_rpo_alpha_adds_the_chosen_responses_nll_averaged_as_asked(sft_model, task_files, nll_average):
    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:4])
    plain, rpo = DPOModule(sft_model), DPOModule(sft_model, rpo_alpha=0.5, nll_average=nll_average)
    for module in (plain, rpo):
        module.configure_model()
    rpo.model.load_state_dict(plain.model.state_dict())
    with torch.no_grad():
        logits = plain.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        rows = []
        for b in range(4):  # chosen rows come first
            rows.append(
                [
                    -torch.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]]
                    for t in range(1, logits.shape[1])
                    if batch["labels"][b, t] != -100
                ]
            )
        if nll_average == "responses":  # each response's token mean
            nll = torch.stack([sum(terms) / len(terms) for terms in rows])
        else:  # one token mean over all the chosen tokens, the same for every pair
            nll = (sum(sum(terms) for terms in rows) / sum(len(terms) for terms in rows)).expand(4)
        difference = rpo.preference_step(batch)["loss"] - plain.preference_step(batch)["loss"]
    torch.testing.assert_close(difference.double(), 0.5 * nll, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "packing, output_layer", [("one_row", "chunked"), ("rows", "chunked"), ("padded", "chunked"), ("one_row", "full")]
)
@pytest.mark.parametrize("adapter", [None, "lora"])
def test_chunked_and_packed_logps_equal_the_padded_logits_path_with_gradients(
    tiny_model, task_files, tmp_path, adapter, packing, output_layer
):
    from lightning_align.scoring.plan import SAFE_PLAN, ScoringPlan, fastest_plan
    from lightning_align.scoring.rows import response_logps
    from tests.conftest import ready

    batch = preference_data(tiny_model, task_files).collate(preference_data(tiny_model, task_files).val_set[:8])
    module = ready(DPOModule(tiny_model), [LoRA(r=4)] if adapter else [], tmp_path)
    assert fastest_plan(module.model, module.device) == ScoringPlan("one_row", "chunked")  # the default path
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padding for packing to drop
    results = []
    for plan in (ScoringPlan(packing, output_layer), SAFE_PLAN):
        module.zero_grad()
        logps = response_logps(module.model, batch, plan=plan)
        (torch.sigmoid(logps / 50) * torch.arange(len(logps))).sum().backward()  # not linear in the log-probs
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results.append((logps.detach(), grads))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
    assert fast_grads.keys() == plain_grads.keys() and len(plain_grads) > 4
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("normalize", [True, False])
def test_ipo_uses_length_averaged_log_ratios_by_default(sft_model, task_files, normalize):
    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    module = DPOModule(sft_model, loss_type="ipo", beta=0.1, ipo_normalize=normalize)
    module.configure_model()
    module.reference.to(module.model)
    torch.manual_seed(0)
    for p in module.model.parameters():  # a policy away from the reference
        p.data.add_(0.01 * torch.randn_like(p))
    with torch.no_grad():
        policy = chosen_rejected_logps(module.model.eval(), batch)
        reference = chosen_rejected_logps(module.reference.network, batch)
        losses = module.preference_step(batch)["loss"]
    lengths = (batch["labels"][:, 1:] != -100).sum(-1).chunk(2)
    expected = []
    for i in range(8):
        h = (policy[0][i] - reference[0][i]) / (lengths[0][i] if normalize else 1)
        h = h - (policy[1][i] - reference[1][i]) / (lengths[1][i] if normalize else 1)
        expected.append((h - 1 / (2 * 0.1)) ** 2)
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge"])
def test_label_smoothing_is_refused_where_it_has_no_meaning(loss_type):
    with pytest.raises(ValueError, match=f"label_smoothing is not defined for loss_type='{loss_type}'"):
        DPOModule("any", loss_type=loss_type, label_smoothing=0.1)


def moved_module(model_path, **options):
    """A DPOModule whose policy has moved away from its reference (so every loss has a gradient to give)."""
    module = DPOModule(model_path, **options)
    module.configure_model()
    module.reference.to(module.model)
    torch.manual_seed(0)
    for p in module.model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    module.model.eval()
    return module


def test_a_weighted_mixture_is_the_weighted_sum_of_its_losses(sft_model, task_files):
    from lightning_align.losses import dpo_loss

    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    module = moved_module(sft_model, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    module.bco_rewards = {"sum": 0.3, "count": 2}  # delta 0.15
    with torch.no_grad():
        policy = chosen_rejected_logps(module.model, batch)
        reference = chosen_rejected_logps(module.reference.network, batch)
        metrics = module.preference_step(batch)
    lengths = (batch["labels"][:, 1:] != -100).sum(-1).chunk(2)
    sigmoid, chosen_rewards, _ = dpo_loss(*policy, *reference, 0.1, "sigmoid")
    bco, _, _ = dpo_loss(*policy, *reference, 0.1, "bco_pair", bco_delta=0.15)
    nll = -policy[0].sum() / lengths[0].sum()  # the "sft" term: the token mean over the batch's chosen tokens
    expected = 0.8 * sigmoid + 0.2 * bco + 1.0 * nll
    torch.testing.assert_close(metrics["loss"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards, rtol=1e-4, atol=1e-5)  # the first type's


def test_bco_delta_is_the_running_mean_of_the_rewards_trained_on_and_resumes(sft_model, task_files, tmp_path):
    import lightning as L

    module = DPOModule(sft_model, loss_type="bco_pair", learning_rate=1e-4)
    seen = []

    class Rewards(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(pl_module.bco_delta)

    fit = trainer(tmp_path, max_steps=3, callbacks=[Rewards()], enable_checkpointing=True)
    fit.fit(module, datamodule=preference_data(sft_model, task_files))
    assert module.bco_rewards["count"] == 3 * 2 * 8 and seen[-1] == module.bco_delta != 0
    checkpoint = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert checkpoint["bco_rewards"] == module.bco_rewards


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_ld_alpha_down_weights_the_longer_responses_tail_for_policy_and_reference(sft_model, task_files, alpha):
    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:8])
    plain, ld = moved_module(sft_model), moved_module(sft_model, ld_alpha=alpha)
    with torch.no_grad():
        logits = ld.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        tokens = []
        for b in range(16):
            tokens.append(
                [
                    torch.log_softmax(logits[b, t - 1], -1)[batch["labels"][b, t]].item()
                    for t in range(1, logits.shape[1])
                    if batch["labels"][b, t] != -100
                ]
            )
        got = ld.sequence_logps(ld.model, batch)
        ref = torch.cat(ld.reference_logps(batch))
        ref_plain = torch.cat(plain.reference_logps(batch))
    for b in range(16):
        shared = min(len(tokens[b % 8]), len(tokens[b % 8 + 8]))
        expected = sum(tokens[b][:shared]) + alpha * sum(tokens[b][shared:])
        assert got[b].item() == pytest.approx(expected, abs=1e-3)
    if alpha == 1.0:
        torch.testing.assert_close(ref, ref_plain)
    else:
        assert (ref > ref_plain).any()  # the reference's tails are down-weighted too (log-probs are negative)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(loss_type="sigmoid", simpo_gamma=1.0), "simpo_gamma is a setting of loss_type 'simpo'"),
        (dict(loss_type="sigmoid", discopop_tau=0.1), "discopop_tau is a setting of loss_type 'discopop'"),
        (dict(loss_type="sigmoid", ipo_normalize=False), "ipo_normalize is a setting of loss_type 'ipo'"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "1 loss_weights for 2 loss types"),
        (dict(loss_type=["sigmoid", "sigmoid"]), "lists a type twice"),
        (dict(loss_type="sft"), "use SFTModule"),
        (dict(loss_type="exo_pair"), "needs 0 < label_smoothing < 1"),
        (dict(loss_type="sigmoid", ld_alpha=1.5), "ld_alpha must be in"),
    ],
)
def test_settings_no_chosen_loss_uses_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        DPOModule("any", **options)


ALL_TYPES = [*DPO_LOSS_TYPES, "simpo"]


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_every_loss_type_trains(loss_type, tiny_model, task_files, tmp_path):
    smoothing = {"exo_pair": 1e-3}.get(loss_type, 0.0)
    module = DPOModule(
        tiny_model, loss_type=[loss_type, "sft"], loss_weights=[1.0, 0.1], label_smoothing=smoothing, learning_rate=1e-3
    )
    fit = trainer(tmp_path, max_steps=2)
    fit.fit(module, datamodule=preference_data(tiny_model, task_files, batch_size=4))
    assert math.isfinite(fit.callback_metrics["train/loss"].item())
    assert (module.reference is None) == (loss_type == "simpo")


def test_wpo_weighs_each_pairs_loss_by_the_policys_aligned_probability_of_both_responses(sft_model, task_files):
    dm = preference_data(sft_model, task_files)
    batch = dm.collate(dm.train_set[:4])
    plain, weighted = moved_module(sft_model), moved_module(sft_model, use_weighting=True)
    with torch.no_grad():
        logits = weighted.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        per_row = []
        for b in range(8):
            terms = []
            for t in range(1, logits.shape[1]):
                if batch["labels"][b, t] != -100:
                    log_p = torch.log_softmax(logits[b, t - 1], -1)
                    terms.append(log_p[batch["labels"][b, t]] - torch.log((log_p.exp() ** 2).sum()))
            per_row.append(torch.exp(sum(terms) / len(terms)))
        expected = plain.preference_step(batch)["loss"].double() * torch.stack(per_row[:4]) * torch.stack(per_row[4:])
        got = weighted.preference_step(batch)["loss"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)
