"""Save the trained model in Hugging Face format when training ends, so the next stage can load it."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from lightning_align.outputs import check_export_target, may_replace, run_output_dir


class ExportPretrained(L.Callback):
    """At the end of `fit`, `module.save_pretrained(dirpath, merge_adapter)`: a plain model folder (with the
    tokenizer) that the next stage names as its model, or with an adapter callback and `merge_adapter=False`,
    the adapter alone.

    The folder is checked before the first step, so a run never trains to find its export refused: it must be new or
    empty (or, when resuming from a checkpoint, hold only the earlier export of this run), unless `overwrite=True`,
    which replaces only the files an export writes. The run's checkpoints and logs are never touched.

    Args:
        dirpath: the folder to write (default: `<default_root_dir>/export`; without a `default_root_dir`, `export`
            beside Lightning's checkpoints or logs).
        merge_adapter: merge a LoRA / QLoRA adapter into a full-precision copy of the base first.
        overwrite: write into a folder that holds other files, replacing only those an export writes.
    """

    def __init__(self, dirpath: str | None = None, merge_adapter: bool = True, overwrite: bool = False):
        self.dirpath, self.merge_adapter, self.overwrite = dirpath, merge_adapter, overwrite

    def export_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else run_output_dir(trainer, "export")

    def output_place(self, trainer: L.Trainer) -> str:
        return f"export in {self.export_dir(trainer)}"

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        # before the first step, once a resumed run's checkpoint is loaded (sharded strategies load it after fit start)
        check_export_target(self.export_dir(trainer), may_replace(trainer, self.export_dir(trainer), self.overwrite))

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        folder = self.export_dir(trainer)
        pl_module.save_pretrained(folder, self.merge_adapter, may_replace(trainer, folder, self.overwrite))
