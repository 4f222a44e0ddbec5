"""The scoring plan: a fast path that differs from the model's own padded forward is caught on the first batch
and replaced (or stops the run); families outside the architecture grid take the safe path unless checked."""

import logging

import pytest
import torch

from lightning_align import DPOModule
from lightning_align.scoring import plan as scoring
from lightning_align.scoring.families import grid_model_types
from lightning_align.scoring.plan import SAFE_PLAN, ScoringPlan, fallbacks
from tests.conftest import padded, random_examples, ready


@pytest.fixture
def bloom_as_if_packable(monkeypatch, model_folders):
    """Bloom with its known refusal forgotten, as a family nobody has tried would be: packing looks possible."""
    monkeypatch.setattr(scoring, "PACKING_REFUSED", {})
    return model_folders("bloom")


def test_the_check_catches_a_wrong_fast_path_and_falls_back(bloom_as_if_packable, tmp_path, caplog):
    module = ready(DPOModule(bloom_as_if_packable), tmp_path=tmp_path)
    batch = padded(random_examples(module.model.config.vocab_size))
    assert scoring.fastest_plan(module.model, module.device).packed
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="packing=rows.* differs by up to"):
        plan = module.scoring_plan(module.model, batch)
    assert not plan.packed
    assert "scoring bloom (BloomForCausalLM): packing=padded" in caplog.text
    assert module.scoring_plan(module.model, batch) is plan  # decided once
    assert caplog.text.count("scoring bloom") == 1  # one line says what runs


def test_scoring_check_error_stops_instead(bloom_as_if_packable, tmp_path):
    module = ready(DPOModule(bloom_as_if_packable, scoring_check="error"), tmp_path=tmp_path)
    batch = padded(random_examples(module.model.config.vocab_size))
    with pytest.raises(RuntimeError, match="scoring bloom .*differs by up to .*scoring_check='fallback'"):
        module.preference_step(batch)


@pytest.mark.parametrize(
    "check, expected", [("off", SAFE_PLAN), ("fallback", ScoringPlan("one_row", "chunked", False))]
)
def test_a_family_outside_the_grid_is_safe_unless_checked(check, expected, monkeypatch, model_folders, tmp_path):
    monkeypatch.setattr(scoring, "grid_model_types", lambda: frozenset())
    module = ready(DPOModule(model_folders("llama"), scoring_check=check), tmp_path=tmp_path)
    batch = padded(random_examples(module.model.config.vocab_size))
    assert module.scoring_plan(module.model, batch) == expected


def test_a_fast_path_that_raises_is_skipped_for_the_next_safer_one(model_folders, tmp_path):
    module = ready(DPOModule(model_folders("llama")), tmp_path=tmp_path)
    expected = torch.arange(3.0)

    def score(plan):
        if plan.packed:
            raise NotImplementedError("packed attention does not apply ['sinks']")
        return expected

    fast = ScoringPlan("one_row", "chunked")
    assert scoring.checked_plan(module.model, fast, score, "fallback", "x") == ScoringPlan("padded", "chunked")


def test_fallbacks_end_with_the_models_own_padded_forward():
    assert fallbacks(ScoringPlan("one_row", "chunked")) == [
        ScoringPlan("one_row", "chunked"),
        ScoringPlan("padded", "chunked"),
        ScoringPlan("padded", "logits_to_keep"),
        SAFE_PLAN,
    ]
    assert fallbacks(SAFE_PLAN) == [SAFE_PLAN]


def test_unknown_scoring_check_is_refused():
    with pytest.raises(ValueError, match="unknown scoring_check 'maybe'; valid: fallback, error, off"):
        DPOModule("any", scoring_check="maybe")


def test_the_grid_covers_the_families_users_bring():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"} | {
        "olmo2",
        "falcon",
        "bloom",
        "mixtral",
        "qwen2_moe",
    } <= grid_model_types()


def test_the_readme_table_of_scoring_paths_is_the_generated_one():
    from pathlib import Path

    from lightning_align.demos.architectures import scoring_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    documented = readme.split("<!-- architectures -->\n")[1].split("\n<!-- /architectures -->")[0]
    assert documented == scoring_table()


def test_sharded_scoring_says_why_the_output_layer_is_not_chunked(model_folders, tmp_path, caplog):
    module = ready(DPOModule(model_folders("llama"), scoring_check="off"), tmp_path=tmp_path)
    assert scoring.output_weight(module.model) is not None  # one process would chunk it
    with caplog.at_level(logging.INFO):
        plan = module.scoring.plan(module.model, lambda plan: None, module.device, sharded=True)
    assert plan.output_layer == "logits_to_keep"
    assert "output layer not chunked: sharded" in caplog.text
