"""GenerationSamples: a CSV of prompts, completions and scores under non-W&B loggers."""

import csv
import json

from lightning.pytorch.loggers import CSVLogger

from lightning_align import GenerationSamples, SFTDataModule, SFTModule
from lightning_align.demos import generate_completions, task_reward
from tests.conftest import trainer


def test_generation_samples_write_a_csv_with_scores_every_n_steps(tiny_model, plain_task_files, tmp_path):
    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], plain_task_files["sft_val"], batch_size=8)
    samples = GenerationSamples(
        every_n_steps=2, num_samples=3, max_new_tokens=6, reward="lightning_align.demos:task_reward"
    )
    module = SFTModule(tiny_model, learning_rate=1e-3)
    logger = CSVLogger(tmp_path, name="run")
    trainer(tmp_path, max_steps=4, logger=logger, callbacks=[samples], limit_val_batches=1).fit(module, datamodule=dm)
    rows = list(csv.DictReader(open(samples.csv_path)))
    assert samples.csv_path.parent == tmp_path / "run" / "version_0"
    assert [r["step"] for r in rows] == ["2"] * 3 + ["4"] * 3 + ["4"] * 3  # steps 2 and 4, and the end
    prompts = [r["prompt"] for r in rows[-3:]]
    assert prompts == [json.loads(line)["prompt"] for line in open(plain_task_files["sft_val"])][:3]
    completions = generate_completions(module.model, module.tokenizer, prompts, max_new_tokens=6)
    assert [r["completion"] for r in rows[-3:]] == completions
    assert [float(r["score"]) for r in rows[-3:]] == task_reward(prompts, completions)


def test_a_reward_that_cannot_score_the_users_prompts_stops_at_setup_not_after_training(tiny_model, tmp_path):
    import pytest

    from tests.conftest import write_jsonl

    rows = [{"prompt": "Summarise: the cat sat.\n", "completion": "A cat sat."}] * 4
    dm = SFTDataModule(tiny_model, str(write_jsonl(tmp_path / "mine.jsonl", rows)), batch_size=2)
    samples = GenerationSamples(reward="lightning_align.demos:task_reward")
    fit = trainer(tmp_path, max_steps=2, callbacks=[samples])
    with pytest.raises(ValueError, match="GenerationSamples: reward 'lightning_align.demos:task_reward' cannot score"):
        fit.fit(SFTModule(tiny_model), datamodule=dm)
    assert fit.global_step == 0


def test_sample_prompts_are_cut_to_the_data_modules_max_length(tiny_model, tmp_path):
    from tests.conftest import write_jsonl

    rows = [{"prompt": "x" * 5000 + "\nreverse: ab\n", "completion": "ba"}] * 2
    dm = SFTDataModule(tiny_model, str(write_jsonl(tmp_path / "long.jsonl", rows)), batch_size=2, max_length=64)
    samples = GenerationSamples(num_samples=1, max_new_tokens=2)
    trainer(tmp_path, max_steps=1, callbacks=[samples], limit_val_batches=0).fit(SFTModule(tiny_model), datamodule=dm)
    assert samples.prompts[0].endswith("reverse: ab\n") and len(samples.prompts[0]) <= 64
