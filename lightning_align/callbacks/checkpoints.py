"""One resumable checkpoint per run directory, and a word on where a run's outputs go."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class LastCheckpoint(ModelCheckpoint):
    """Keeps one `last.ckpt` in `dirpath` (default: `<default_root_dir>/checkpoints`, the same folder for every
    run and resume, not one per logger run), written every `every_n_train_steps` steps and when training ends, so
    a run of any length leaves a checkpoint to resume from: `--ckpt_path <dirpath>/last.ckpt`."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 50):
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step != self._last_global_step_saved:
            trainer.save_checkpoint(str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"))
            self._last_global_step_saved = trainer.global_step


def output_places(trainer: L.Trainer) -> list[str]:
    """Where this run writes what a user keeps: checkpoints, exports, adapters, samples."""
    from lightning_align.callbacks.export import ExportPretrained
    from lightning_align.callbacks.lora import LoRA

    places = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            places.append(f"checkpoints in {callback.dirpath}")
        elif isinstance(callback, ExportPretrained):
            places.append(f"export in {callback.export_dir(trainer)}")
        elif isinstance(callback, LoRA):
            places.append(f"adapter in {callback.adapter_dir(trainer)}")
    return places


def report_output_places(trainer: L.Trainer, when: str) -> None:
    places = output_places(trainer)
    if places:
        rank_zero_info(f"{when}: " + "; ".join(places))
