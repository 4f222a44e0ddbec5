"""What the online RL methods share (PPO, GRPO, RLOO, REINFORCE++): sample responses to prompts, score them with
one or several rewards, read the responses' log-probs through the chunked output layer, and learn with several
optimiser steps per rollout batch, `max_steps` counting optimiser steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric

from lightning_align.environments import Environment
from lightning_align.modules.base import AlignModule, ModelSource
from lightning_align.modules.episodes import sample_episodes, scored_by_the_environment
from lightning_align.modules.optimisation import clip_gradients
from lightning_align.modules.reference import Reference
from lightning_align.modules.rewards import RewardModelScorer, Rewards, RewardSource
from lightning_align.modules.sampling import ProcessShare, Sampler
from lightning_align.modules.sharding import gathered_while_decoding, is_sharded, shard
from lightning_align.scoring.model import eval_mode
from lightning_align.scoring.plan import CHECKED_ROWS, Scoring, ScoringPlan, output_weight
from lightning_align.scoring.responses import response_forward

# Shown in the progress bar (the rest goes to the loggers, every rollout batch).
PROGRESS_METRICS = ("reward", "kl", "len")


def response_mask(responses: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over the response tokens up to and including the first EOS, whether each response has an EOS)."""
    is_eos = responses == eos_token_id
    ended = is_eos.any(-1)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long(), ended


class OnlineRLModule(AlignModule):
    """Base of the online RL modules: trains a policy on `PromptDataModule` prompts against rewards it samples.

    Args:
        policy: the model to train (name, folder or `nn.Module`).
        reward: one reward source or a list: a function `(prompts, completions, **row_fields) -> scores` (a score
            may be None: that reward abstains on the sample), its import path `"package.module:function"`, or a
            reward model folder (a `RewardModule` export; its own tokenizer re-encodes the text). A function
            receives the prompt row's other fields it names (or all, with **kwargs), as lists over the batch.
        reward_weights: one weight per reward (default 1 each); reward_aggregation: "sum_then_normalize" or
            "normalize_then_sum" (each reward normalised over its group before the weighted sum).
        max_new_tokens, temperature, top_k, top_p: sampling of the rollouts (with the KV cache; see
            `modules.sampling`).
        max_grad_norm: gradient clipping of each optimiser step (done here: several steps per rollout batch).
        disable_dropout: switch dropout off, so the rollout's log-probs, the learning passes' and the reference's
            agree; the reference runs in eval mode either way.
        scoring_check: as `DPOModule`'s: the chunked output layer is checked on the first rollout's rows against
            the model's own forward ("fallback", "error", "off").
        environment: multi-turn, tool-using episodes instead of single completions (`environments.Environment`,
            e.g. `ToolEnvironment([calculator], reward=...)`): the policy's turns end at EOS or a tool call's end,
            the environment's answers are appended, and only the policy's own tokens are trained on and counted in
            the KL and the normalisation (`modules.episodes`). The environment scores the episodes: give no
            `reward` then.
        Other arguments as `AlignModule`.

    `max_steps` counts optimiser steps, and a run stops at the step it names, inside a rollout batch if need be.
    Every rollout batch's metrics go to the loggers whatever `log_every_n_steps` says (a rollout batch is many
    steps' worth of work); reward, KL and response length are in the progress bar.
    """

    batch_kind = "prompts"
    uses_reference = True
    shards_proven = True  # tests/distributed/test_fsdp.py: PPO and GRPO, full and LoRA, 2 processes equal to one

    def __init__(
        self,
        policy: ModelSource,
        reward: RewardSource | Sequence[RewardSource] | None = None,
        reward_weights: list[float] | None = None,
        reward_aggregation: str = "sum_then_normalize",
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        max_grad_norm: float | None = 1.0,
        disable_dropout: bool = True,
        scoring_check: str = "fallback",
        environment: Environment | None = None,
        **kwargs,
    ):
        super().__init__(policy, **kwargs)
        if max_new_tokens < 1 or not temperature > 0:
            raise ValueError(f"max_new_tokens must be >= 1 and temperature > 0, got {max_new_tokens}, {temperature}")
        if (reward is None) == (environment is None):
            raise ValueError("give rewards (functions or reward models) or an environment that scores its episodes")
        self.automatic_optimization = False  # several optimiser steps per rollout batch
        self.environment = environment
        reward = scored_by_the_environment if reward is None else reward
        self.rewards = Rewards(reward, reward_weights, reward_aggregation)
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
        self.max_grad_norm = max_grad_norm
        self.disable_dropout = disable_dropout
        self.scoring = Scoring(scoring_check)
        self.sampler = Sampler()
        self.reference: Reference | None = None
        self.val_reward = MeanMetric()

    # ----- set-up ------------------------------------------------------------------------------------------------
    @property
    def needs_reference(self) -> bool:
        return True

    def make_reference(self) -> None:
        if self.reference is None and self.needs_reference:
            self.reference = Reference(self.model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.reference is not None:
            self.reference.to(self.model)
        self.ensure_rewards()
        reference = self.reference.kind if self.reference is not None else "none (no KL term)"
        rewards = ", ".join(self.rewards.names) if self.environment is None else type(self.environment).__name__
        rank_zero_info(f"{type(self).__name__} reference: {reference}; rewards: {rewards}")

    def longest_row(self) -> int | None:
        # A prompt needs room for the response after it.
        positions = super().longest_row()
        return None if positions is None else positions - self.sampling["max_new_tokens"]

    def row_length_fix(self, limit: int) -> str:
        return (
            f"the model has {limit + self.sampling['max_new_tokens']} positions and max_new_tokens="
            f"{self.sampling['max_new_tokens']} follow each prompt; set the data module's max_length to at most "
            f"{limit} (prompts are then cut from the left, counted) or lower max_new_tokens"
        )

    def configure_callbacks(self):
        # Lightning's own check of this comes before any other hook, with a long traceback and no way forward.
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError(
                f"{type(self).__name__} takes several optimiser steps per rollout batch itself, so "
                f"accumulate_grad_batches={self.trainer.accumulate_grad_batches} cannot apply; remove it, and set the "
                "samples per optimiser step with minibatch_size (and the rollout batch with the data's batch_size)"
            )
        return []

    def ensure_rewards(self) -> None:
        param = next(self.model.parameters())
        self.rewards.resolve(self.device, param.dtype if param.is_floating_point() else None)
        if self.device_mesh is not None:  # reward models sharded like the policy, gathered layer by layer to score
            for scorer in self.rewards.functions:
                if isinstance(scorer, RewardModelScorer) and not is_sharded(scorer.module.model):
                    scorer.module.padding_free = False  # its score head then runs inside the forward that gathers it
                    shard(scorer.module.model, self.device_mesh["data_parallel"])

    # ----- sampling and scoring ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, batch: dict, greedy: bool = False, num_return_sequences: int = 1, logprobs: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts + responses [batch * num_return_sequences, prompt + response], a prompt's samples adjacent; with
        `logprobs`, also the sampler's log-probs of the responses (None where it has none to give)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, 0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, 0)
        with eval_mode(self.model), gathered_while_decoding(self.model):
            sequences, sampled_logprobs = self.sampler(
                self.model,
                input_ids,
                attention_mask,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
                greedy=greedy,
                logprobs=logprobs,
                share=self.process_share(num_return_sequences),
                **self.sampling,
            )
        return (sequences, sampled_logprobs) if logprobs else sequences

    def process_share(self, group: int) -> ProcessShare | None:
        if self._trainer is None:
            return None
        strategy = self.trainer.strategy

        def any_running(running: bool) -> bool:
            return strategy.reduce_boolean_decision(running, all=False)

        return ProcessShare(self.trainer.global_rank, self.trainer.world_size, group, any_running)

    # ----- the global batch: statistics over every process's rows ------------------------------------------------
    @property
    def processes(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def over_global_batch(self, function: Callable[..., torch.Tensor], *rows: torch.Tensor) -> torch.Tensor:
        """`function` of the global batch's rows (every process's, each process holding as many), returning this
        process's: batch statistics (whitening, a batch std) then equal those of one process with the whole batch."""
        if self.processes == 1:
            return function(*rows)
        gathered = [self.all_rows(row) for row in rows]
        mine = len(rows[0])
        return function(*gathered)[self.trainer.global_rank * mine : (self.trainer.global_rank + 1) * mine]

    def all_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every process's rows (this one's alone with one process)."""
        return rows if self.processes == 1 else self.all_gather(rows.contiguous()).flatten(0, 1)

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.processes == 1 else self.trainer.strategy.reduce(value.clone(), reduce_op="sum")

    def token_share(self, mask: torch.Tensor) -> torch.Tensor:
        """This process's share of the global mini-batch's tokens, times the processes: a token mean over this
        process's rows times it, averaged over the processes (as their gradients are), is the global token mean."""
        if self.processes == 1:
            return mask.new_ones(())
        tokens = mask.sum()
        return tokens * self.processes / self.global_sum(tokens).clamp(min=1)

    def own_rows_order(self, rows: int, device) -> torch.Tensor:
        """A random order of this process's rows, drawn as one process with the whole batch draws its order (the
        same random numbers on every process): with one mini-batch per pass, the processes then learn as it does."""
        if self.processes == 1:
            return torch.randperm(rows, device=device)
        order = torch.randperm(rows * self.processes, device=device)
        return order[order % self.processes == self.trainer.global_rank] // self.processes

    @property
    def sampled_logprobs_exact(self) -> bool:
        """Whether the sampler's log-probs may stand for the rollout's (pi_old): in full float32 they equal a
        forward pass's to about 1e-6 (the architecture grid checks it); in lower precision the cached decode and a
        full pass round differently, so the rollout takes a forward pass."""
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        floats = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        return precision in ("32-true", "32") and all(dtype == torch.float32 for dtype in floats)

    def completions(self, sequences: torch.Tensor, prompt_length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """(decoded responses, their mask up to and including EOS, whether each ended with EOS)."""
        mask, ended = response_mask(sequences[:, prompt_length:], self.tokenizer.eos_token_id)
        texts = self.tokenizer.batch_decode(sequences[:, prompt_length:] * mask, skip_special_tokens=True)
        return texts, mask, ended

    def scores(self, batch: dict, completions: list[str], group_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(each reward's scores [samples, rewards], NaN where one abstained; the combined reward [samples])."""
        self.ensure_rewards()
        prompts = [p for p in batch["prompts"] for _ in range(group_size)]
        fields = {
            name: [v for v in values for _ in range(group_size)] for name, values in batch.get("fields", {}).items()
        }
        each = self.rewards.score(prompts, completions, fields).to(self.device)
        return each, self.over_global_batch(lambda scores: self.rewards.combine(scores, group_size), each)

    # ----- log-probs of the responses ----------------------------------------------------------------------------
    def scoring_plan(self, model: nn.Module, sequences, attention_mask, prompt_length: int, mask) -> ScoringPlan:
        """The output layer of `response_forward` for `model`, decided (and checked) at the first rollout."""
        rows = slice(0, CHECKED_ROWS)

        def score(plan: ScoringPlan) -> torch.Tensor:
            logps, _ = response_forward(
                model, sequences[rows], attention_mask[rows], prompt_length, mask[rows], plan, self.temperature
            )
            return logps[mask[rows].bool()]

        # Packed only with the chunked output layer (the plan that takes it): packed rows' logits are never needed.
        packing = not self.weights_sharded and output_weight(model) is not None
        return self.scoring.plan(model, score, sequences.device, sharded=self.weights_sharded, packing=packing)

    @property
    def temperature(self) -> float:
        return self.sampling["temperature"]

    def response_logps(self, model: nn.Module, rollout: dict, rows=slice(None), want_hidden: bool = False):
        """`response_forward` of `model` on the rollout's rows (the plan is the policy's: the reference shares its
        architecture, and under LoRA is the same network)."""
        sequences, attention_mask, mask = rollout["sequences"], rollout["attention_mask"], rollout["mask"]
        plan = self.scoring_plan(self.model, sequences, attention_mask, rollout["prompt_length"], mask)
        return response_forward(
            model,
            sequences[rows],
            attention_mask[rows],
            rollout["prompt_length"],
            mask[rows],
            plan,
            self.temperature,
            want_hidden,
        )

    @torch.no_grad()
    def sample(self, batch: dict, group_size: int = 1) -> dict:
        """A rollout batch: sequences, masks, decoded completions and rewards, with the time each part took."""
        started = time.perf_counter()
        prompt_length = batch["input_ids"].shape[1]
        sequences, sampled_logprobs = self.generate(batch, num_return_sequences=group_size, logprobs=True)
        generated = time.perf_counter()
        completions, mask, ended = self.completions(sequences, prompt_length)
        each, combined = self.scores(batch, completions, group_size)
        prompt_mask = batch["attention_mask"].repeat_interleave(group_size, 0)
        return {
            "sequences": sequences,
            "attention_mask": torch.cat([prompt_mask, mask], dim=1),
            "prompt_length": prompt_length,
            "mask": mask.float(),
            "ended": ended,
            "completions": completions,
            "each_reward": each,
            "reward": combined,
            "sampled_logprobs": sampled_logprobs * mask if sampled_logprobs is not None else None,
            "time/generate": generated - started,
            "time/reward": time.perf_counter() - generated,
        }

    @torch.no_grad()
    def sample_rollout(self, batch: dict, group_size: int = 1, greedy: bool = False) -> dict:
        """The rollout batch's samples: one completion each, or multi-turn episodes with an environment."""
        if self.environment is not None:
            return sample_episodes(self, batch, self.environment, 1 if greedy else group_size, greedy)
        if greedy:
            raise ValueError("greedy rollouts are sampled by validation_step")
        return self.sample(batch, group_size)

    # ----- learning ----------------------------------------------------------------------------------------------
    def optimizer_step(self, losses: torch.Tensor | Iterable[torch.Tensor]) -> bool:
        """One optimiser step on a loss, or on the sum of several computed one after another's backward (for
        separate networks, so only one network's activations are held at a time), with the non-finite policy,
        clipping and the schedule; False if skipped."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad()
        for loss in [losses] if isinstance(losses, torch.Tensor) else losses:
            if self.finite_or_none(loss, None) is None:
                optimizer.zero_grad(set_to_none=True)
                return False
            self.manual_backward(loss)
        if not self.gradients_finite():
            return False
        if self.max_grad_norm is not None:
            clip_gradients(self, optimizer, self.max_grad_norm, "norm")
        optimizer.step()  # Lightning counts these: max_steps is in optimiser steps
        # Dropped now, not before the next backward: the next step's forward then runs without them.
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        return True

    def steps_left(self) -> int | None:
        max_steps = self.trainer.max_steps if self._trainer is not None else -1
        return None if max_steps is None or max_steps < 0 else max(0, max_steps - self.global_step)

    def log_rollout(self, stats: dict[str, float], samples: int) -> None:
        """Every rollout batch's metrics to the loggers (not every `log_every_n_steps`), a few in the progress bar."""
        if self.processes > 1:  # the global batch's, as one process with the whole batch logs them
            values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
            averaged = self.trainer.strategy.reduce(values, reduce_op="mean").tolist()
            stats = dict(zip(stats, averaged, strict=True))
        progress = {"reward": stats["reward/mean"], "len": stats["response_length"]}
        if "kl" in stats:
            progress["kl"] = stats["kl"]
        self.log_dict(progress, prog_bar=True, logger=False, batch_size=samples)
        if self._trainer is not None:
            for logger in self.loggers:
                logger.log_metrics({f"train/{name}": value for name, value in stats.items()}, step=self.global_step)
        self.logged_rollout = stats  # read by tests and benchmarks

    def reward_stats(self, rollout: dict) -> dict[str, float]:
        """The rewards' statistics over the global batch (every process's rows)."""
        reward, each, lengths, ended = (
            self.all_rows(rows)
            for rows in (rollout["reward"], rollout["each_reward"], rollout["mask"].sum(-1), rollout["ended"].float())
        )
        scored = reward[~reward.isnan()]
        return {
            "reward/mean": float(scored.mean()) if len(scored) else float("nan"),
            "reward/std": float(scored.std()) if len(scored) > 1 else 0.0,
            **self.rewards.means(each),
            "response_length": float(lengths.mean()),
            "completions/truncated": float(1 - ended.mean()),
        }

    # ----- validation: mean reward of greedy completions ---------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.val_reward.reset()

    def validation_step(self, batch, batch_idx):
        if self.environment is not None:  # greedy episodes, scored by the environment
            reward = self.sample_rollout(batch, greedy=True)["reward"]
            self.val_reward.update(reward[~reward.isnan()])
            return
        prompt_length = batch["input_ids"].shape[1]
        completions, _, _ = self.completions(self.generate(batch, greedy=True), prompt_length)
        _, reward = self.scores(batch, completions)
        self.val_reward.update(reward[~reward.isnan()])

    def on_validation_epoch_end(self) -> None:
        self.log("val/reward", self.val_reward.compute(), prog_bar=True)
