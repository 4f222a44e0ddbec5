"""Critic-free online RL on the rollout machinery of PPO: GRPO (with Dr. GRPO's and DAPO's forms), RLOO and
REINFORCE++. No value model: the baseline is the other samples of the same prompt, or the batch."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from lightning_align.environments import Environment
from lightning_align.losses import (
    IMPORTANCE_SAMPLING_LEVELS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    SCALE_REWARDS,
    batch_advantages,
    clipped_policy_loss,
    group_advantages,
    kl_penalty,
    masked_mean,
    reinforce_pp_advantages,
    rloo_advantages,
)
from lightning_align.modules.base import ModelSource
from lightning_align.modules.episodes import episode_metrics, last_sampled
from lightning_align.modules.online import OnlineRLModule
from lightning_align.modules.rewards import RewardSource
from lightning_align.modules.signal import GroupBuffer, LearningSignal, groups_with_spread

ADVANTAGES = ("grpo", "rloo", "reinforce++")


def normalized(advantages: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    """(A - mean A) / (std A + 1e-4) over the scored samples (unbiased std; abstained ones, NaN reward, stay 0)."""
    scored = ~reward.isnan()
    values = advantages[scored]
    std = values.std() if len(values) > 1 else values.new_zeros(())
    return torch.where(scored, (advantages - values.mean()) / (std + 1e-4), 0.0)


class GRPOModule(OnlineRLModule):
    """Group Relative Policy Optimization (Shao et al. 2024) and its critic-free relatives, on `PromptDataModule`
    prompts against reward functions (verifiers) or reward models.

    Args:
        policy: the model to train (name, folder or `nn.Module`).
        rewards, reward_weights, reward_aggregation: one reward or several, weighted (see `OnlineRLModule`); a
            verifier function reads the prompt row's fields, e.g. `answer`.
        advantage: "grpo" (group-normalised rewards, `group_advantages`; after reward_aggregation=
            "normalize_then_sum", GDPO's normalisation over the batch instead, `batch_advantages`, as TRL's
            multi_objective_aggregation), "rloo" (leave-one-out baseline,
            `rloo_advantages`) or "reinforce++" (per-token KL-shaped rewards, returns normalised over the batch,
            `reinforce_pp_advantages`).
        num_generations: samples per prompt (the group); a rollout batch is `batch_size * num_generations`.
        scale_rewards: GRPO's "group" std, the "batch" std, or "none" (Dr. GRPO).
        loss_aggregation: "grpo" (per-sequence mean; the paper's and our default, TRL's default is "dapo"),
            "dr_grpo" (constant normaliser), "dapo" (token mean over the generation batch) or "bnpo" (token mean
            over each mini-batch); see `clipped_policy_loss`.
        policy_loss: "clip" (PPO's clipped surrogate), "cispo" (the clipped ratio weighs a REINFORCE term;
            `epsilon_high` is the ratio's cap, e.g. 5) or "sapo" (a soft gate; `sapo_temperature_pos` / `_neg`).
            TRL's loss_type="cispo" is policy_loss="cispo" with loss_aggregation="dapo"; "sapo" with "grpo".
        importance_sampling_level: "token" (default), "sequence" (GSPO: one length-normalised ratio per sample)
            or "sequence_sum" (the whole sequence's probability ratio, as TRL's RLOOTrainer).
        epsilon, epsilon_high: the ratio clip, [1 - epsilon, 1 + epsilon_high] (DAPO's clip-higher: 0.28).
        kl_in_reward: subtract beta times each sample's summed k1 KL (log pi_old - log pi_ref) from its reward
            before the baseline, instead of adding beta * k3 to the loss (RLOO's paper and TRL's RLOOTrainer).
        normalize_advantages: normalise the advantages over the generation batch, (A - mean) / (std + 1e-4), as
            TRL's RLOOConfig(normalize_advantages=True).
        use_bias_correction_kl: weigh the k3 term by the importance ratio (DeepSeek-V3.2's unbiased KL gradient;
            TRL 1.16's default). False (default): DeepSeekMath's plain k3, whose gradient differs whenever beta > 0.
        num_iterations: learning passes over each generation batch (GRPO's mu); minibatch_size: samples per
            optimiser step, per process (default: the whole generation batch, one step per pass).
        beta: KL to the reference. GRPO and RLOO add beta * k3 to the loss; REINFORCE++ subtracts beta * KL_t
            (k1) from each token's reward. None: 0 for GRPO and RLOO (no reference model is kept: TRL's default
            and Dr. GRPO's finding), 0.01 for REINFORCE++.
        mask_truncated_completions: leave completions that hit `max_new_tokens` without EOS out of the loss
            (DAPO's overlong filtering).
        environment: multi-turn, tool-using episodes instead of single completions (`environments.Environment`,
            e.g. `ToolEnvironment([calculator], reward=...)`): the policy's turns end at EOS or a tool call's end,
            the environment's answers are appended, and only the policy's own tokens are trained on and counted in
            the KL and the normalisation (`modules.episodes`). The environment scores the episodes: leave
            `rewards` out. `max_new_tokens` is per turn; Dr. GRPO's constant normaliser is then the episode's
            budget, the environment's `max_tokens`.
        dynamic_sampling: DAPO's dynamic sampling: groups whose samples all got the same reward (zero advantage)
            are dropped, and the rollout batch is filled with the groups of the next prompts before learning.
        max_batches_without_signal: stop with an error after this many rollout batches in a row without a
            learning signal (every group's rewards equal, or every reward abstaining; with dynamic sampling, no
            group kept); each one is warned about. None: never stop.
        Other arguments as `OnlineRLModule` (sampling, `max_grad_norm`, `disable_dropout`, `scoring_check`) and
        `AlignModule`.

    `max_steps` counts optimiser steps: `num_iterations * ceil(batch * num_generations / minibatch_size)` per
    rollout batch (1 with the defaults). `groups/zero_std` (TRL's `frac_reward_zero_std`) is the share of groups
    whose rewards did not differ, logged every rollout batch.
    """

    def __init__(
        self,
        policy: ModelSource,
        rewards: RewardSource | Sequence[RewardSource] | None = None,
        advantage: str = "grpo",
        num_generations: int = 8,
        scale_rewards: str = "group",
        loss_aggregation: str = "grpo",
        policy_loss: str = "clip",
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        kl_in_reward: bool = False,
        normalize_advantages: bool = False,
        use_bias_correction_kl: bool = False,
        num_iterations: int = 1,
        minibatch_size: int | None = None,
        beta: float | None = None,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        environment: Environment | None = None,
        max_batches_without_signal: int | None = 10,
        reward_weights: list[float] | None = None,
        reward_aggregation: str = "sum_then_normalize",
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        **kwargs,
    ):
        if advantage not in ADVANTAGES:
            raise ValueError(f"unknown advantage {advantage!r}; valid: {', '.join(ADVANTAGES)}")
        if scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"unknown scale_rewards {scale_rewards!r}; valid: {', '.join(SCALE_REWARDS)}")
        if loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"unknown loss_aggregation {loss_aggregation!r}; valid: {', '.join(LOSS_AGGREGATIONS)}")
        if policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy_loss {policy_loss!r}; valid: {', '.join(POLICY_LOSSES)}")
        if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"unknown importance_sampling_level {importance_sampling_level!r}; valid: "
                f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        if (kl_in_reward or normalize_advantages) and advantage == "reinforce++":
            raise ValueError("advantage='reinforce++' has the KL in each token's reward and whitened advantages")
        if num_generations < 1 or num_iterations < 1 or (minibatch_size is not None and minibatch_size < 1):
            raise ValueError("num_generations, num_iterations and minibatch_size must be at least 1")
        if advantage in ("grpo", "rloo") and num_generations < 2:
            raise ValueError(f"advantage={advantage!r} compares the samples of a prompt: num_generations must be >= 2")
        if advantage != "grpo" and scale_rewards != "group":
            raise ValueError(f"scale_rewards is GRPO's setting; advantage={advantage!r} does not use it")
        if reward_aggregation == "normalize_then_sum" and scale_rewards != "group":
            raise ValueError(
                f"scale_rewards={scale_rewards!r} has no effect with reward_aggregation='normalize_then_sum', whose "
                "summed rewards are normalised over the batch (GDPO; TRL ignores scale_rewards there too); remove it"
            )
        super().__init__(
            policy,
            rewards,
            reward_weights,
            reward_aggregation,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            environment=environment,
            **kwargs,
        )
        self.advantage = advantage
        self.num_generations = num_generations
        self.scale_rewards = scale_rewards
        self.loss_aggregation = loss_aggregation
        self.policy_loss, self.importance_sampling_level = policy_loss, importance_sampling_level
        self.sapo_temperatures = (sapo_temperature_pos, sapo_temperature_neg)
        self.kl_in_reward, self.normalize_advantages = kl_in_reward, normalize_advantages
        self.use_bias_correction_kl = use_bias_correction_kl
        self.epsilon, self.epsilon_high = epsilon, epsilon_high
        self.num_iterations, self.minibatch_size = num_iterations, minibatch_size
        self.beta = beta if beta is not None else (0.01 if advantage == "reinforce++" else 0.0)
        self.mask_truncated_completions = mask_truncated_completions
        if max_batches_without_signal is not None and max_batches_without_signal < 1:
            raise ValueError(f"max_batches_without_signal must be at least 1 or None, got {max_batches_without_signal}")
        if dynamic_sampling and num_generations < 2:
            raise ValueError("dynamic_sampling keeps the groups whose samples differ: num_generations must be >= 2")
        self.dynamic_sampling = dynamic_sampling
        self.signal = LearningSignal(max_batches_without_signal)
        self.kept_groups = GroupBuffer()

    @property
    def needs_reference(self) -> bool:
        return self.beta != 0

    @property
    def kl_in_loss(self) -> bool:
        return self.advantage != "reinforce++" and not self.kl_in_reward and self.beta != 0

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.dynamic_sampling and self.trainer.world_size > 1:
            raise ValueError(
                "dynamic_sampling fills each process's batch at its own pace, so the processes would step apart; it "
                "runs on one process for now"
            )

    # ----- rollout -----------------------------------------------------------------------------------------------
    def several_steps(self, samples: int) -> bool:
        """Whether the policy moves between the rollout and a learning pass (then the rollout's log-probs are
        needed as pi_old; else pi_old is the learning pass's own, detached)."""
        return self.num_iterations > 1 or (self.minibatch_size or samples) < samples

    @property
    def response_budget(self) -> int:
        """The most response tokens of a sample (Dr. GRPO's normaliser): a completion's, or a whole episode's."""
        return self.environment.max_tokens if self.environment is not None else self.sampling["max_new_tokens"]

    @torch.no_grad()
    def rollout(self, batch: dict) -> dict:
        return self.scored_rollout(self.sample_rollout(batch, self.num_generations))

    def with_signal(self, rollout: dict) -> tuple[dict | None, float]:
        """The rollout to learn from (with dynamic sampling: the kept groups once they fill a batch, else None)
        and the share of its groups without reward spread; counts batches without a learning signal."""
        group_size = self.num_generations
        spread = groups_with_spread(rollout["reward"], group_size)
        zero_std = float((~spread).float().mean())
        if self.advantage == "reinforce++":  # one baseline for the whole batch
            has_signal = bool(groups_with_spread(rollout["reward"], len(rollout["reward"])).all())
        else:
            has_signal = bool(spread.any())
        if self._trainer is not None:  # every process stops (or not) alike
            has_signal = self.trainer.strategy.reduce_boolean_decision(has_signal, all=False)
        self.signal.update(has_signal, rollout["reward"], "every group's samples got the same reward")
        if not self.dynamic_sampling:
            return rollout, zero_std
        self.kept_groups.add(rollout, spread, group_size)
        groups = len(rollout["sequences"]) // group_size
        return self.kept_groups.full_batch(groups, group_size, self.tokenizer.pad_token_id), zero_std

    @torch.no_grad()
    def scored_rollout(self, rollout: dict) -> dict:
        """A sampled rollout with what learning needs: pi_old where the policy moves, the reference's log-probs,
        the advantages."""
        started = time.perf_counter()
        mask = rollout["mask"]
        if self.mask_truncated_completions:
            mask = rollout["loss_mask"] = mask * rollout["ended"][:, None].float()
        else:
            rollout["loss_mask"] = mask
        samples = len(rollout["sequences"])
        # The reference first: sharded, the policy's forward leaves its root gathered for the step that follows.
        if self.reference is not None:
            with self.reference(self.model) as reference:
                rollout["ref_logprobs"], _ = self.response_logps(reference, rollout)
        if self.several_steps(samples) or self.advantage == "reinforce++" or (self.kl_in_reward and self.reference):
            if rollout["sampled_logprobs"] is not None and self.sampled_logprobs_exact:
                rollout["logprobs"] = rollout["sampled_logprobs"]  # the sampler's: no forward pass
            else:
                rollout["logprobs"], _ = self.response_logps(self.model, rollout)
        reward = rollout["reward"]
        if self.kl_in_reward and self.reference is not None:  # RLOO's k1 KL, summed per sample, in the reward
            kl = kl_penalty(rollout["logprobs"], rollout["ref_logprobs"], "k1")
            reward = reward - self.beta * (kl * rollout["mask"]).sum(-1)
            rollout["kl"] = float(self.all_rows(masked_mean(kl, rollout["mask"])[None]).mean())
        if self.advantage == "grpo" and self.rewards.aggregation == "normalize_then_sum":
            rollout["advantages"] = self.over_global_batch(batch_advantages, reward)  # GDPO, as TRL
        elif self.advantage == "grpo":
            rollout["advantages"] = self.over_global_batch(
                lambda r: group_advantages(r, self.num_generations, self.scale_rewards), reward
            )
        elif self.advantage == "rloo":
            rollout["advantages"] = rloo_advantages(reward, self.num_generations)
        else:
            kl = kl_penalty(rollout["logprobs"], rollout["ref_logprobs"], "k1") if self.reference else 0 * mask
            token_rewards = -self.beta * kl * rollout["mask"]
            last = last_sampled(rollout["mask"])
            token_rewards[torch.arange(samples), last] += torch.nan_to_num(reward)
            advantages = self.over_global_batch(reinforce_pp_advantages, token_rewards, rollout["mask"])
            rollout["advantages"] = torch.where(reward.isnan()[:, None], 0.0, advantages)
            rollout["kl"] = float(self.all_rows((kl * rollout["mask"]).sum(-1)).mean())
        if self.normalize_advantages:
            rollout["advantages"] = self.over_global_batch(normalized, rollout["advantages"], reward)
        rollout["time/score"] = time.perf_counter() - started
        return rollout

    # ----- learning ----------------------------------------------------------------------------------------------
    def learn(self, rollout: dict) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        samples = len(rollout["sequences"])
        size = self.minibatch_size or samples
        minibatches = -(-samples // size)
        # DAPO's token mean over the whole generation batch (every process's), spread evenly over its mini-batches;
        # the processes' gradients are averaged, hence the division by their number.
        num_tokens = self.global_sum(rollout["loss_mask"].sum()) / self.processes / minibatches
        for _ in range(self.num_iterations):
            order = self.own_rows_order(samples, rollout["sequences"].device) if minibatches > 1 else None
            for rows in order.split(size) if order is not None else [slice(None)]:
                if self.steps_left() == 0:  # max_steps counts optimiser steps: stop mid rollout batch
                    break
                loss, stats = self.minibatch_loss(rollout, rows, num_tokens)
                if not self.optimizer_step(loss):
                    continue
                stats["loss"] = loss.detach()
                for name, value in stats.items():
                    totals.setdefault(name, []).append(float(value))
        return {name: sum(values) / len(values) for name, values in totals.items()}

    def minibatch_loss(self, rollout: dict, rows, num_tokens) -> tuple[torch.Tensor, dict]:
        """The clipped policy loss of the rollout's rows `rows` (with its statistics), `num_tokens` the
        normaliser of DAPO's token mean."""
        logprobs, _ = self.response_logps(self.model, rollout, rows)
        old = rollout["logprobs"][rows] if "logprobs" in rollout else logprobs.detach()
        loss, stats = clipped_policy_loss(
            logprobs,
            old,
            rollout["advantages"][rows],
            rollout["loss_mask"][rows],
            self.epsilon,
            self.epsilon_high,
            self.loss_aggregation,
            ref_logprobs=rollout["ref_logprobs"][rows] if self.kl_in_loss else None,
            beta=self.beta,
            max_completion_length=self.response_budget,
            num_tokens=num_tokens,
            importance_sampling_level=self.importance_sampling_level,
            policy_loss=self.policy_loss,
            sapo_temperatures=self.sapo_temperatures,
            bias_correction_kl=self.use_bias_correction_kl,
        )
        # Token means, each over the global mini-batch once the processes' are averaged for the log.
        share = self.token_share(rollout["loss_mask"][rows])
        stats = {name: value * share for name, value in stats.items()}
        stats["entropy"] = masked_mean(-logprobs.detach(), rollout["mask"][rows]) * self.token_share(
            rollout["mask"][rows]
        )
        return loss, stats

    def step_loss(self, rollout: dict) -> torch.Tensor:
        """An optimiser step's loss on all of a rollout's rows."""
        return self.minibatch_loss(rollout, slice(None), rollout["loss_mask"].sum())[0]

    def training_step(self, batch, batch_idx):
        rollout, zero_std = self.with_signal(self.sample_rollout(batch, self.num_generations))
        if rollout is None:  # dynamic sampling: not yet a batch of groups with spread
            return
        rollout = self.scored_rollout(rollout)
        learning = time.perf_counter()
        learned = self.learn(rollout)
        stats = self.reward_stats(rollout)
        for name in ("loss", "clipfrac", "approx_kl", "entropy"):
            if name in learned:
                stats[name if name in ("loss", "entropy") else f"policy/{name}"] = learned[name]
        if "kl" in learned or "kl" in rollout:
            stats["kl"] = learned.get("kl", rollout.get("kl"))
        if "episode_stats" in rollout:
            stats |= episode_metrics(rollout)
        stats["groups/zero_std"] = zero_std  # of the batch just sampled (dynamic sampling learns on kept groups)
        stats |= {
            "time/generate": rollout["time/generate"],
            "time/reward": rollout["time/reward"],
            "time/score": rollout["time/score"],
            "time/learn": time.perf_counter() - learning,
        }
        self.log_rollout(stats, len(rollout["sequences"]))
