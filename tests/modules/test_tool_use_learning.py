"""The calculator demo's claim, measured as `make demo` measures it (`demos.tool_use.calculator_stage`): after SFT
on traces of which half call the calculator, the model calls it for only some held-out sums; GRPO with the
calculator raises held-out accuracy well above SFT alone, and above GRPO without the tool, which cannot add
4-digit numbers at all."""

import lightning as L
import pytest

from lightning_align.demos.tool_use import calculator_stage
from tests.conftest import TEST_SEED, report_gain, trainer


@pytest.mark.learning
def test_grpo_with_the_calculator_beats_sft_alone_and_grpo_without_the_tool(sft_model, tmp_path):
    L.seed_everything(TEST_SEED)
    results = calculator_stage(
        sft_model, tmp_path, lambda name, steps: trainer(tmp_path / name, max_steps=steps, limit_val_batches=0)
    )
    sft, grpo, without = results["sft"], results["grpo"], results["grpo without the tool"]
    report_gain(sft["accuracy"], grpo["accuracy"], f"calls {sft['tool_calls']:.2f} -> {grpo['tool_calls']:.2f}")
    print(results)
    assert grpo["accuracy"] >= sft["accuracy"] + 0.15
    assert grpo["accuracy"] >= without["accuracy"] + 0.5
    assert grpo["tool_calls"] > sft["tool_calls"] and grpo["well_formed"] >= 0.95
    assert results["sft without the tool"]["accuracy"] <= 0.05  # the task needs the tool
