"""SIGTERM mid-training leaves a checkpoint that resumes exactly; a crash while saving keeps the last one."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("sigterm_run.py")


def losses(text: str) -> dict[int, str]:
    return {int(step): loss for step, loss in re.findall(r"^step (\d+) loss (\S+)$", text, re.M)}


def child(*args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SCRIPT.parents[2])}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kwargs,
    )


def test_sigterm_mid_training_leaves_a_checkpoint_that_resumes_exactly(tiny_model, tmp_path):
    run = child(tmp_path / "killed", 12)
    seen = []
    for line in run.stdout:
        seen.append(line)
        if line.startswith("step 4 "):
            run.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + run.stdout.read()
    run.wait(timeout=120)
    assert "step 12 " not in output  # stopped before the end (Lightning exits with status 0 on SIGTERM)
    checkpoint = tmp_path / "killed" / "on_exception.ckpt"
    assert checkpoint.is_file(), output[-2000:]
    stopped_at = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 4 <= stopped_at < 12

    resumed = child(tmp_path / "resumed", 12, checkpoint)
    whole = child(tmp_path / "whole", 12)
    resumed_losses, whole_losses = (
        losses(resumed.communicate(timeout=300)[0]),
        losses(whole.communicate(timeout=300)[0]),
    )
    assert resumed.returncode == 0 and whole.returncode == 0
    assert sorted(resumed_losses) == list(range(stopped_at + 1, 13))
    assert {step: whole_losses[step] for step in resumed_losses} == resumed_losses


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tiny_model, plain_task_files, tmp_path, monkeypatch):
    import fsspec.implementations.local
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_align import SFTDataModule, SFTModule
    from tests.conftest import trainer

    checkpoints = ModelCheckpoint(
        tmp_path / "ckpt", filename="last", every_n_train_steps=2, enable_version_counter=False
    )
    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=8, max_length=64)
    trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[checkpoints]).fit(
        SFTModule(tiny_model, learning_rate=1e-3), datamodule=dm
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    good = path.read_bytes()

    write = fsspec.implementations.local.LocalFileOpener.write

    def crash_halfway(self, data):
        write(self, data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "write", crash_halfway)
    with pytest.raises(OSError, match="simulated"):
        trainer(tmp_path, max_steps=4, enable_checkpointing=True, callbacks=[checkpoints]).fit(
            SFTModule(tiny_model, learning_rate=1e-3), datamodule=dm, ckpt_path=str(path)
        )
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert torch.load(path, weights_only=True)["global_step"] == 2
