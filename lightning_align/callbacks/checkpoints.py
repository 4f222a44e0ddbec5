"""One resumable checkpoint per run directory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """Keeps one `last.ckpt` in `dirpath` (default: `<default_root_dir>/checkpoints`, the same folder for every
    run and resume, not one per logger run), written every `every_n_train_steps` steps and when training ends, so
    a run of any length leaves a checkpoint to resume from: `--ckpt_path <dirpath>/last.ckpt`.

    A run that resumes from a checkpoint writes its `last.ckpt` over the one it continues. A new run (no
    `ckpt_path`) into a folder that already holds a `last.ckpt` is refused before the first step, since that file is
    another run's: resume it, give the new run another `default_root_dir`, or pass `overwrite=True`."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 50, overwrite: bool = False):
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,  # no last-v1.ckpt beside the last.ckpt the configs resume from
        )
        self.overwrite = overwrite

    def last_path(self, trainer: L.Trainer) -> Path:
        folder = self.dirpath or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def check_new_run(self, trainer: L.Trainer, ckpt_path) -> None:
        """Refuse a new run whose `last.ckpt` would replace an earlier run's."""
        last = self.last_path(trainer)
        if ckpt_path or self.overwrite or not last.exists():
            return
        raise FileExistsError(
            f"{last} holds an earlier run's checkpoint, which this new run would replace. Resume that run with "
            f"--ckpt_path {last} (trainer.fit(..., ckpt_path=...)), give this run another trainer.default_root_dir, "
            "or pass LastCheckpoint(overwrite=True) to start over"
        )

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # Not at fit start: sharded strategies (ModelParallelStrategy, FSDP) load the checkpoint after it, and only
        # then is `trainer.ckpt_path` set. Still before the first step.
        super().on_train_start(trainer, pl_module)
        self.check_new_run(trainer, trainer.ckpt_path)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(str(self.last_path(trainer)))
            self._last_global_step_saved = trainer.global_step
