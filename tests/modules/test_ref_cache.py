"""Precomputed reference log-probs cached on disk: reused when nothing changed, recomputed (and said why) else."""

import json
import logging

import pytest
import torch

from lightning_align import DPOModule, PreferenceDataModule
from lightning_align.modules import dpo
from tests.conftest import trainer


@pytest.fixture
def counted_reference_passes(monkeypatch):
    """Counts forward passes of the reference over preference batches."""
    calls = []
    original = dpo.chosen_rejected_logps

    def counting(model, batch, average=False, **options):
        calls.append(len(batch["input_ids"]))
        return original(model, batch, average, **options)

    monkeypatch.setattr(dpo, "chosen_rejected_logps", counting)
    return calls


def precompute(model_path, train, val, cache, tmp_path, max_length=64):
    dm = PreferenceDataModule(model_path, train, val, batch_size=8, max_length=max_length)
    module = DPOModule(model_path, ref_cache_dir=str(cache), learning_rate=0.0)
    trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    return torch.tensor([[e["ref_chosen_logps"], e["ref_rejected_logps"]] for e in dm.train_set + dm.val_set])


def small_copy(task_files, tmp_path, n=24):
    rows = [json.loads(line) for line in open(task_files["preference_train"])][:n]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    return train, val, rows


def test_second_run_reuses_the_cache_without_a_reference_pass(
    sft_model, task_files, tmp_path, counted_reference_passes, caplog
):
    train, val, _ = small_copy(task_files, tmp_path)
    first = precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "a")
    assert sum(counted_reference_passes) == 2 * (24 + 8)  # chosen and rejected rows
    counted_reference_passes.clear()
    with caplog.at_level(logging.INFO):
        second = precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "b")
    assert counted_reference_passes == []  # only the policy ran, in the training step
    assert "reusing" in caplog.text
    torch.testing.assert_close(second, first)


def test_a_changed_row_or_max_length_recomputes_and_says_why(
    sft_model, task_files, tmp_path, counted_reference_passes, caplog
):
    train, val, rows = small_copy(task_files, tmp_path)
    precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "a")
    rows[3]["chosen"] = rows[3]["chosen"] + "0"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    counted_reference_passes.clear()
    with caplog.at_level(logging.INFO):
        changed = precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "b")
    assert sum(counted_reference_passes) == 2 * (
        24 + 8
    )  # chosen and rejected rows and "stale (train data changed)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "c", max_length=12)
    assert "max_length changed" in caplog.text
    assert changed.shape == (32, 2)


def test_a_truncated_cache_file_is_rejected_and_recomputed(
    sft_model, task_files, tmp_path, counted_reference_passes, caplog
):
    train, val, _ = small_copy(task_files, tmp_path)
    first = precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "a")
    cache_file = tmp_path / "cache" / "ref_logps.pt"
    cache_file.write_bytes(cache_file.read_bytes()[:200])
    counted_reference_passes.clear()
    with pytest.warns(UserWarning, match="ref_logps.pt is unreadable"):
        again = precompute(sft_model, train, val, tmp_path / "cache", tmp_path / "b")
    assert sum(counted_reference_passes) == 2 * (24 + 8)  # chosen and rejected rows
    torch.testing.assert_close(again, first)
    assert torch.load(cache_file, weights_only=True)["logps"]["train"].shape == (24, 2)  # rewritten whole
