"""The demo's tool-use stage and its held-out evaluation: greedy episodes on prompts the run never saw, scored
exactly, with the tool calls they made. `examples/demo.py` runs the stage and its test asserts the gain."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lightning_align.demos.calculator import add, answer_reward, write_calculator_data
from lightning_align.environments import ToolEnvironment


def calculator_environment(with_tool: bool = True, max_tokens: int = 160) -> ToolEnvironment:
    """The calculator task's environment; without the tool, a call is an unknown tool's and ends the episode with
    reward -1, so a policy trained there learns to answer alone."""
    return ToolEnvironment([add] if with_tool else [], reward=answer_reward, max_turns=3, max_tokens=max_tokens)


def held_out_rows(path: str | Path, limit: int | None = None) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit]


@torch.no_grad()
def tool_use_accuracy(module, rows: list[dict], environment, batch_size: int = 50) -> dict[str, float]:
    """Greedy episodes of `module` (an online RL module with its tokenizer) on `rows` (prompt and answer):
    the share answered exactly, tool calls per episode, and the share of calls that were well formed."""
    from lightning_align.modules.episodes import sample_episodes

    was_training = module.training
    module.eval()
    right, calls, malformed = 0.0, 0, 0
    try:
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            batch = {"prompts": [r["prompt"] for r in part], "fields": {"answer": [r["answer"] for r in part]}}
            rollout = sample_episodes(module, batch, environment, 1, greedy=True)
            right += float((rollout["reward"] == 1.0).sum())
            calls += sum(s.tool_calls for s in rollout["episode_stats"])
            malformed += sum(s.malformed_calls for s in rollout["episode_stats"])
    finally:
        module.train(was_training)
    return {
        "accuracy": right / len(rows),
        "tool_calls": calls / len(rows),
        "well_formed": calls / (calls + malformed) if calls + malformed else float("nan"),
    }


def calculator_stage(start: str, folder: str | Path, make_trainer, sft_steps: int = 1200, grpo_steps: int = 20):
    """From `start` (a causal LM folder; the demo's SFT model): SFT on 4-digit sums whose traces call the
    calculator half of the time and answer alone the other half, then GRPO from that model with the calculator,
    and for comparison GRPO without it. `make_trainer(name, max_steps)` gives each run's Trainer.

    Returns held-out results (`tool_use_accuracy` on 100 unseen prompts) by name: "sft" and "grpo" with the
    calculator available, "sft without the tool" and "grpo without the tool"."""
    from lightning_align.data import PromptDataModule, SFTDataModule
    from lightning_align.modules import GRPOModule, SFTModule

    folder = Path(folder)
    data = write_calculator_data(folder / "data", digits=4, tool_share=0.5)
    rows = held_out_rows(data["calculator_prompts_val"], 100)
    traces = SFTDataModule(
        start, data["calculator_sft_train"], data["calculator_sft_val"], batch_size=16, max_length=160
    )
    sft = SFTModule(start, learning_rate=3e-3, warmup_steps=10)
    make_trainer("calculator_sft", sft_steps).fit(sft, datamodule=traces)
    sft_path = str(sft.save_pretrained(folder / "calculator_sft" / "export", overwrite=True))
    results = {}
    for with_tool, suffix in ((True, ""), (False, " without the tool")):
        environment = calculator_environment(with_tool)
        grpo = GRPOModule(
            sft_path,
            environment=environment,
            num_generations=8,
            max_new_tokens=96,
            learning_rate=5e-5,
            warmup_steps=5,
            # without the tool no 4-digit sum comes out right, so no batch has a learning signal: the comparison
            # runs its steps anyway instead of stopping
            **({} if with_tool else {"max_batches_without_signal": None}),
        )
        prompts = PromptDataModule(
            sft_path,
            data["calculator_prompts_train"],
            data["calculator_prompts_val"],
            batch_size=8,
            max_length=64,
            apply_chat_template=False,  # episodes render their prompts with the template and the tools
        )
        grpo.configure_model()
        results["sft" + suffix] = tool_use_accuracy(grpo, rows, environment)
        make_trainer(("calculator_grpo" + suffix).replace(" ", "_"), grpo_steps).fit(grpo, datamodule=prompts)
        results["grpo" + suffix] = tool_use_accuracy(grpo, rows, environment)
    return results
