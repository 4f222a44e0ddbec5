"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022): sample, score, shape with KL, learn."""

from __future__ import annotations

import time

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lightning_align.losses import gae, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from lightning_align.modules.base import AlignModule, ModelSource, disable_dropout
from lightning_align.modules.reference import Reference
from lightning_align.modules.rewards import RewardFunction, checked_scores, resolve_reward


class AdaptiveKLController:
    """KL coefficient that follows a target KL (Ziegler et al. 2019, eq. 2):
    beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon). Fixed when `target` is None."""

    def __init__(self, kl_coef: float, target: float | None = None, horizon: int = 10_000):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


def load_critic(path: str, vocab_size: int) -> nn.Module:
    """A separate value model from a reward model folder: its score head, applied at every position, is V(s_t)."""
    from transformers import AutoModelForSequenceClassification

    from lightning_align.modules.base import load_pretrained

    critic = load_pretrained(path, AutoModelForSequenceClassification, num_labels=1)
    if not hasattr(critic, "score"):
        raise ValueError(f"critic '{path}': {type(critic).__name__} has no `score` head to read values from")
    if critic.config.vocab_size != vocab_size:
        raise ValueError(
            f"critic '{path}' has a vocabulary of {critic.config.vocab_size} tokens, the policy {vocab_size}: "
            "the critic reads the policy's token ids, so it must share the policy's tokenizer"
        )
    return critic.train()


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over the response tokens up to and including the first EOS, whether each response has an EOS)."""
    is_eos = responses == eos_token_id
    ended = is_eos.any(-1)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long(), ended


class PPOModule(AlignModule):
    """Trains a policy on `PromptDataModule` prompts with PPO against a reward function or reward model.

    Args:
        policy: the model to train (name, folder or `nn.Module`).
        reward: a function `(prompts, completions) -> list[float]`, its import path `"package.module:function"`,
            or a reward model folder (a `RewardModule` export; its own tokenizer re-encodes the text).
        max_new_tokens, temperature, top_k, top_p: sampling of the rollouts.
        ppo_epochs, minibatch_size: passes over each rollout batch and sequences per gradient step.
        clip_eps, value_clip_eps, vf_coef: PPO's policy and value clipping and the value loss weight.
        gamma, lam: discount and GAE parameter.
        critic: a reward model folder (sharing the policy's tokenizer) to initialise a separate value model from,
            trained in full beside the policy, as in Ouyang et al. 2022. By default the value model is a scalar
            head on the policy's last hidden states: no second network.
        kl_coef, target_kl, kl_horizon: KL penalty weight, adaptive when `target_kl` is set.
        kl_estimator: "k1", "k2" or "k3" (see `kl_penalty`). The logged `kl` (also as `kl/<estimator>`) is the
            estimate summed over each response and averaged over the batch; k1's is unbiased but may be negative
            per token and, on a small batch, overall; k3's is never negative.
        whiten_scores, score_clip, missing_eos_penalty: score normalisation over the batch, clipping to
            [-score_clip, score_clip], and a penalty subtracted from completions that did not end with EOS.
        disable_dropout: switch dropout off in the policy and critic (as TRL does), so the rollout's log-probs,
            the learning passes' and the reference's agree; the reference runs in eval mode either way.
        Other arguments as `AlignModule`.

    The reference is the adapter-disabled policy under LoRA / QLoRA, else a frozen copy of the starting policy.
    """

    batch_kind = "prompts"
    uses_reference = True

    def __init__(
        self,
        policy: ModelSource,
        reward: str | RewardFunction,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        ppo_epochs: int = 2,
        minibatch_size: int = 8,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        vf_coef: float = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        critic: str | None = None,
        kl_coef: float = 0.05,
        target_kl: float | None = None,
        kl_horizon: int = 10_000,
        kl_estimator: str = "k1",
        whiten_scores: bool = False,
        score_clip: float | None = None,
        missing_eos_penalty: float | None = None,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        self.automatic_optimization = False  # several optimiser steps per rollout batch
        self.reward_source = reward
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.ppo_epochs, self.minibatch_size = ppo_epochs, minibatch_size
        self.clip_eps, self.value_clip_eps, self.vf_coef = clip_eps, value_clip_eps, vf_coef
        self.gamma, self.lam = gamma, lam
        self.kl_controller = AdaptiveKLController(kl_coef, target_kl, kl_horizon)
        self.kl_estimator = kl_estimator
        self.whiten_scores, self.score_clip, self.missing_eos_penalty = whiten_scores, score_clip, missing_eos_penalty
        self.max_grad_norm = max_grad_norm
        self.disable_dropout = disable_dropout
        self.critic_source = critic
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None
        self.reference: Reference | None = None
        self.reward_fn: RewardFunction | None = None
        self.val_reward = MeanMetric()

    # ----- set-up ------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        super().configure_model()
        if self.critic_source is not None and self.critic is None:
            self.critic = load_critic(self.critic_source, self.model.config.vocab_size)
        if self.disable_dropout and self.critic is not None:  # the policy's is off already (AlignModule)
            disable_dropout(self.critic)
        if self.critic_source is None and self.value_head is None:
            self.value_head = nn.Linear(self.model.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        if self.reference is None:
            self.reference = Reference(self.model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference.to(self.model)
        self.ensure_reward()
        rank_zero_info(f"PPOModule reference: {self.reference.kind}; reward: {self.reward_name}")

    def ensure_reward(self) -> None:
        if self.reward_fn is None:
            self.reward_fn, self.reward_name = resolve_reward(self.reward_source)
            if hasattr(self.reward_fn, "to"):  # a reward model: on the policy's device, in its floating dtype
                param = next(self.model.parameters())
                self.reward_fn.to(self.device, param.dtype if param.is_floating_point() else None)

    # ----- per-token quantities ----------------------------------------------------------------------------------
    def response_forward(self, model: nn.Module, sequences, attention_mask, prompt_length: int, with_values: bool):
        """Log-probs of the response tokens under `model` (logits scaled by the sampling temperature, as when
        sampling), their entropy, and the value head's estimates, each [batch, response_length]."""
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=sequences,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=with_values and self.critic is None,
        )
        # Position t predicts token t+1: the response tokens are predicted from prompt_length-1 onwards.
        logits = out.logits[:, prompt_length - 1 : -1].float() / self.sampling["temperature"]
        log_softmax = torch.log_softmax(logits, -1)
        responses = sequences[:, prompt_length:]
        logprobs = log_softmax.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_softmax.exp() * log_softmax).sum(-1)
        values = None
        if with_values and self.critic is not None:
            hidden = self.critic.base_model(
                input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
            values = self.critic.score(hidden[:, prompt_length - 1 : -1]).squeeze(-1).float()
        elif with_values:
            hidden = out.hidden_states[-1][:, prompt_length - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logprobs, entropy, values

    # ----- rollout -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, greedy: bool = False) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        options = {"do_sample": False} if greedy else {"do_sample": True, **self.sampling}
        options["max_new_tokens"] = self.sampling["max_new_tokens"]
        try:
            return self.model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **options,
            )
        finally:
            self.model.train(was_training)

    def completions(self, sequences: torch.Tensor, prompt_length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        mask, ended = response_mask(sequences[:, prompt_length:], self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(sequences[:, prompt_length:] * mask, skip_special_tokens=True)
        return texts, mask, ended

    def scores(self, prompts: list[str], completions: list[str], ended: torch.Tensor) -> torch.Tensor:
        self.ensure_reward()
        try:
            raw = self.reward_fn(prompts, completions)
        except Exception as err:  # a user function: say whose error it is
            raise RuntimeError(f"reward {self.reward_name} raised {type(err).__name__}: {err}") from err
        scores = torch.tensor(checked_scores(raw, len(completions), self.reward_name), device=self.device)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~ended).float()
        return scores

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        prompt_length = batch["input_ids"].shape[1]
        sequences = self.generate(batch)
        completions, mask, ended = self.completions(sequences, prompt_length)
        attention_mask = torch.cat([batch["attention_mask"], mask], dim=1)
        logprobs, _, values = self.response_forward(self.model, sequences, attention_mask, prompt_length, True)
        with self.reference(self.model) as reference:
            ref_logprobs, _, _ = self.response_forward(reference, sequences, attention_mask, prompt_length, False)
        scores = self.scores(batch["prompts"], completions, ended)
        shaped = scores
        if self.whiten_scores:
            shaped = whiten(shaped, torch.ones_like(shaped), shift_mean=False)
        if self.score_clip is not None:
            shaped = shaped.clamp(-self.score_clip, self.score_clip)
        mask_f = mask.float()
        kl = kl_penalty(logprobs, ref_logprobs, self.kl_estimator) * mask_f
        rewards = -self.kl_controller.value * kl
        last = mask.sum(-1).clamp(min=1) - 1
        rewards[torch.arange(len(rewards)), last] += shaped
        advantages, returns = gae(rewards, values * mask_f, mask_f, self.gamma, self.lam)
        return {
            "sequences": sequences,
            "attention_mask": attention_mask,
            "prompt_length": prompt_length,
            "mask": mask_f,
            "logprobs": logprobs,
            "values": values,
            "advantages": whiten(advantages, mask_f) * mask_f,
            "returns": returns,
            "scores": scores,
            "kl": (kl.sum(-1)).mean(),
        }

    # ----- learning ----------------------------------------------------------------------------------------------
    def learn(self, rollout: dict) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        totals: dict[str, list[float]] = {}
        n = len(rollout["sequences"])
        for _ in range(self.ppo_epochs):
            for index in torch.randperm(n, device=rollout["sequences"].device).split(self.minibatch_size):
                if self.steps_left() == 0:  # max_steps counts optimiser steps: stop mid rollout batch
                    break
                logprobs, entropy, values = self.response_forward(
                    self.model,
                    rollout["sequences"][index],
                    rollout["attention_mask"][index],
                    rollout["prompt_length"],
                    True,
                )
                mask = rollout["mask"][index]
                policy_loss, clipfrac, approx_kl = ppo_policy_loss(
                    logprobs, rollout["logprobs"][index], rollout["advantages"][index], mask, self.clip_eps
                )
                value_loss = ppo_value_loss(
                    values, rollout["values"][index], rollout["returns"][index], mask, self.value_clip_eps
                )
                optimizer.zero_grad()
                loss = self.finite_or_none(policy_loss + self.vf_coef * value_loss, None)
                if loss is None:
                    continue
                self.manual_backward(loss)
                if not self.gradients_finite():
                    continue
                if self.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()  # Lightning counts these: max_steps is in optimiser steps
                if scheduler is not None:
                    scheduler.step()
                for name, value in (
                    ("loss/policy", policy_loss.detach()),
                    ("loss/value", value_loss.detach()),
                    ("policy/clipfrac", clipfrac),
                    ("policy/approx_kl", approx_kl),
                    ("entropy", masked_mean(entropy.detach(), mask)),
                ):
                    totals.setdefault(name, []).append(value.item())
        return {name: sum(values) / len(values) for name, values in totals.items()}

    def steps_left(self) -> int | None:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return None if max_steps is None or max_steps < 0 else max(0, max_steps - self.global_step)

    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        rollout = self.rollout(batch)
        rolled = time.perf_counter()
        stats = self.learn(rollout)
        kl = float(rollout["kl"])
        stats |= {
            "reward/mean": float(rollout["scores"].mean()),
            "reward/std": float(rollout["scores"].std()) if len(rollout["scores"]) > 1 else 0.0,
            "kl": kl,
            f"kl/{self.kl_estimator}": kl,  # which estimator: k1 is unbiased but can be negative on a batch
            "kl_coef": self.kl_controller.value,
            "response_length": float(rollout["mask"].sum(-1).mean()),
            "time/rollout": rolled - started,
            "time/learn": time.perf_counter() - rolled,
        }
        self.kl_controller.update(kl, len(rollout["sequences"]))
        self.log_dict(stats, prog_bar=False, batch_size=len(rollout["sequences"]))

    # ----- validation: mean score of greedy completions ----------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_reward.reset()

    def validation_step(self, batch, batch_idx):
        prompt_length = batch["input_ids"].shape[1]
        completions, _, ended = self.completions(self.generate(batch, greedy=True), prompt_length)
        self.val_reward.update(self.scores(batch["prompts"], completions, ended))

    def on_validation_epoch_end(self) -> None:
        self.log("val/reward", self.val_reward.compute(), prog_bar=True)

    # ----- resume ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_controller.value

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_controller.value = checkpoint.get("kl_coef", self.kl_controller.value)
