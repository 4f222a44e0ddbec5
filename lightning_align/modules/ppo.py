"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022): sample, score, shape with KL, learn."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lightning_align.environments import Environment
from lightning_align.losses import gae, kl_penalty, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from lightning_align.modules.base import ModelSource
from lightning_align.modules.episodes import episode_metrics, last_sampled
from lightning_align.modules.online import OnlineRLModule, response_mask  # noqa: F401 (response_mask: API)
from lightning_align.modules.pretrained import disable_dropout
from lightning_align.modules.rewards import RewardSource
from lightning_align.scoring.plan import CHECKED_ROWS, ScoringPlan
from lightning_align.scoring.scores import score_head_values


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

    from lightning_align.modules.pretrained import load_pretrained
    from lightning_align.modules.rewards import check_reward_model_folder

    check_reward_model_folder(path)
    critic = load_pretrained(path, AutoModelForSequenceClassification, num_labels=1)
    if not hasattr(critic, "score"):
        raise ValueError(f"critic '{path}': {type(critic).__name__} has no `score` head to read values from")
    if critic.config.vocab_size != vocab_size:
        raise ValueError(
            f"critic '{path}' has a vocabulary of {critic.config.vocab_size} tokens, the policy {vocab_size}: "
            "the critic reads the policy's token ids, so it must share the policy's tokenizer"
        )
    return critic.train()


class PPOModule(OnlineRLModule):
    """Trains a policy on `PromptDataModule` prompts with PPO against reward functions or reward models.

    Args:
        policy: the model to train (name, folder or `nn.Module`).
        reward, reward_weights, reward_aggregation: one reward or several, weighted (see `OnlineRLModule`).
        environment: multi-turn, tool-using episodes scored by the environment, instead of `reward` (see
            `OnlineRLModule`). Each episode's score goes on its last sampled token, and GAE steps over the policy's
            tokens only: the value after a turn's last token is the value at the next turn's first.
        max_new_tokens, temperature, top_k, top_p: sampling of the rollouts.
        ppo_epochs, minibatch_size: passes over each rollout batch and sequences per optimiser step (per process,
            like the data's batch_size).
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
        Other arguments as `OnlineRLModule` (`max_grad_norm`, `disable_dropout`, `scoring_check`) and
        `AlignModule`.

    The reference is the adapter-disabled policy under LoRA / QLoRA, else a frozen copy of the starting policy.
    `max_steps` counts optimiser steps: a rollout batch of 32 prompts with `minibatch_size=8` and `ppo_epochs=2`
    makes 8 of them.
    """

    def __init__(
        self,
        policy: ModelSource,
        reward: RewardSource | Sequence[RewardSource] | None = None,
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
        environment: Environment | None = None,
        **kwargs,
    ):
        if environment is not None and environment.cut_reward is None:
            raise ValueError(
                "PPO needs a score for every episode, and an episode cut at the environment's max_turns or max_tokens "
                "gets its cut_reward: set cut_reward (e.g. 0.0) on the environment"
            )
        super().__init__(
            policy,
            reward,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            environment=environment,
            **kwargs,
        )
        self.ppo_epochs, self.minibatch_size = ppo_epochs, minibatch_size
        self.clip_eps, self.value_clip_eps, self.vf_coef = clip_eps, value_clip_eps, vf_coef
        self.gamma, self.lam = gamma, lam
        self.kl_controller = AdaptiveKLController(kl_coef, target_kl, kl_horizon)
        self.kl_estimator = kl_estimator
        self.whiten_scores, self.score_clip, self.missing_eos_penalty = whiten_scores, score_clip, missing_eos_penalty
        self.critic_source = critic
        self.critic: nn.Module | None = None
        self.value_head: nn.Linear | None = None

    # ----- set-up ------------------------------------------------------------------------------------------------
    def make_reference(self) -> None:
        """The reference, and the value model (before any sharding, which shards it too)."""
        super().make_reference()
        if self.critic_source is not None and self.critic is None:
            self.critic = load_critic(self.critic_source, self.model.config.vocab_size)
        if self.disable_dropout and self.critic is not None:  # the policy's is off already (AlignModule)
            disable_dropout(self.critic)
        if self.critic_source is None and self.value_head is None:
            self.value_head = nn.Linear(self.model.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def networks_to_shard(self) -> list[nn.Module]:
        return [*super().networks_to_shard(), *(n for n in (self.critic, self.value_head) if n is not None)]

    # ----- per-token quantities ----------------------------------------------------------------------------------
    def policy_forward(self, rollout: dict, rows=slice(None), with_values: bool = True):
        """The policy's log-probs of the responses and the value model's estimates, each [rows, response]."""
        shared_head = with_values and self.critic is None
        logprobs, hidden = self.response_logps(self.model, rollout, rows, want_hidden=shared_head)
        if not with_values:
            return logprobs, None
        if self.critic is not None:
            return logprobs, self.critic_values(rollout, rows)
        return logprobs, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def critic_values(self, rollout: dict, rows=slice(None)) -> torch.Tensor:
        """The separate value model's estimates V(s_t) at the positions that predict each response token
        [rows, response] (0 past a response's end when its rows are scored packed)."""
        sequences, attention_mask = rollout["sequences"], rollout["attention_mask"]
        plan = self.critic_plan(rollout)
        return score_head_values(
            self.critic, sequences[rows], attention_mask[rows], rollout["prompt_length"], rollout["mask"][rows], plan
        )

    def critic_plan(self, rollout: dict) -> ScoringPlan:
        """How the value model scores (packed where proven or checked), decided at the first rollout."""
        rows = slice(0, CHECKED_ROWS)
        args = [rollout[key][rows] for key in ("sequences", "attention_mask")]
        mask = rollout["mask"][rows]

        def score(plan: ScoringPlan) -> torch.Tensor:
            return score_head_values(self.critic, *args, rollout["prompt_length"], mask, plan)[mask.bool()]

        device = rollout["sequences"].device
        return self.scoring.plan(self.critic, score, device, sharded=self.weights_sharded, packing=True)

    # ----- rollout -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        rollout = self.sample_rollout(batch)
        started = time.perf_counter()
        # The reference first: sharded, the policy's forward leaves its root gathered for the step that follows.
        with self.reference(self.model) as reference:
            ref_logprobs, _ = self.response_logps(reference, rollout)
        if self.critic is not None and rollout["sampled_logprobs"] is not None and self.sampled_logprobs_exact:
            rollout["logprobs"], values = rollout["sampled_logprobs"], self.critic_values(rollout)  # one pass less
        else:
            rollout["logprobs"], values = self.policy_forward(rollout)
        scores = rollout["reward"]
        if scores.isnan().any():
            source = "the environment's reward" if self.environment is not None else "every reward"
            raise ValueError(f"{source} abstained (returned None) on a sample; PPO needs a score for each sample")
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~rollout["ended"]).float()
        shaped = scores
        if self.whiten_scores:
            shaped = self.over_global_batch(lambda s: whiten(s, torch.ones_like(s), shift_mean=False), shaped)
        if self.score_clip is not None:
            shaped = shaped.clamp(-self.score_clip, self.score_clip)
        mask = rollout["mask"]
        kl = kl_penalty(rollout["logprobs"], ref_logprobs, self.kl_estimator) * mask
        rewards = -self.kl_controller.value * kl
        rewards[torch.arange(len(rewards)), last_sampled(mask)] += shaped
        advantages, returns = gae(rewards, values * mask, mask, self.gamma, self.lam)
        rollout |= {
            "values": values,
            "advantages": self.over_global_batch(whiten, advantages, mask) * mask,
            "returns": returns,
            "scores": scores,
            "kl": self.all_rows(kl.sum(-1)).mean(),  # the global batch's: every process's controller moves alike
            # The sampled tokens' mean -log p: an unbiased estimate of the policy's per-token entropy.
            "entropy": masked_mean(self.all_rows(-rollout["logprobs"]), self.all_rows(mask)),
            "time/score": time.perf_counter() - started,
        }
        return rollout

    # ----- learning ----------------------------------------------------------------------------------------------
    def learn(self, rollout: dict) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        n = len(rollout["sequences"])
        for _ in range(self.ppo_epochs):
            for index in self.own_rows_order(n, rollout["sequences"].device).split(self.minibatch_size):
                if self.steps_left() == 0:  # max_steps counts optimiser steps: stop mid rollout batch
                    break
                losses: dict[str, torch.Tensor] = {}
                if not self.optimizer_step(self.minibatch_losses(rollout, index, losses)):
                    continue
                for name, value in losses.items():
                    totals.setdefault(name, []).append(value.item())
        return {name: sum(values) / len(values) for name, values in totals.items()}

    def minibatch_losses(self, rollout: dict, index: torch.Tensor | slice, stats: dict) -> Iterator[torch.Tensor]:
        """The losses of one optimiser step on the rollout's rows `index`, recording them in `stats`. With a
        separate value model, its loss comes after the policy's backward, so one network's activations are held
        at a time."""
        mask = rollout["mask"][index]
        separate = self.critic is not None
        logprobs, values = self.policy_forward(rollout, index, with_values=not separate)
        share = self.token_share(mask)  # token means over the global mini-batch (the processes' are averaged)
        policy_loss, clipfrac, approx_kl = ppo_policy_loss(
            logprobs, rollout["logprobs"][index], rollout["advantages"][index], mask, self.clip_eps
        )
        policy_loss = policy_loss * share
        stats |= {"policy/clipfrac": clipfrac * share, "policy/approx_kl": approx_kl * share}
        stats["loss/policy"] = policy_loss.detach()
        if separate:
            yield policy_loss
            values = self.critic_values(rollout, index)
        old_values, returns = rollout["values"][index], rollout["returns"][index]
        value_loss = ppo_value_loss(values, old_values, returns, mask, self.value_clip_eps) * share
        stats["loss/value"] = value_loss.detach()
        yield self.vf_coef * value_loss if separate else policy_loss + self.vf_coef * value_loss

    def step_losses(self, rollout: dict) -> Iterator[torch.Tensor]:
        """An optimiser step's losses on all of a rollout's rows (as `minibatch_losses`)."""
        return self.minibatch_losses(rollout, slice(None), {})

    def training_step(self, batch, batch_idx):
        rollout = self.rollout(batch)
        learning = time.perf_counter()
        stats = self.learn(rollout)
        kl = float(rollout["kl"])
        stats |= self.reward_stats(rollout) | {
            "kl": kl,
            f"kl/{self.kl_estimator}": kl,  # which estimator: k1 is unbiased but can be negative on a batch
            "kl_coef": self.kl_controller.value,
            "entropy": float(rollout["entropy"]),
            "time/generate": rollout["time/generate"],
            "time/reward": rollout["time/reward"],
            "time/score": rollout["time/score"],
            "time/learn": time.perf_counter() - learning,
        }
        if "episode_stats" in rollout:
            stats |= episode_metrics(rollout)
        self.kl_controller.update(kl, len(rollout["sequences"]) * self.processes)
        self.log_rollout(stats, len(rollout["sequences"]))

    # ----- resume ------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_controller.value

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_controller.value = checkpoint.get("kl_coef", self.kl_controller.value)
