"""Save the trained model in Hugging Face format when training ends, so the next stage can load it."""

from __future__ import annotations

import lightning as L


class ExportPretrained(L.Callback):
    """At the end of `fit`, `module.save_pretrained(dirpath, merge_adapter)`: a plain model folder (with the
    tokenizer) that the next stage names as its model, or with an adapter callback and `merge_adapter=False`,
    the adapter alone.

    Args:
        dirpath: the folder to write (default: `<default_root_dir>/export`).
        merge_adapter: merge a LoRA / QLoRA adapter into a full-precision copy of the base first.
    """

    def __init__(self, dirpath: str | None = None, merge_adapter: bool = True):
        self.dirpath, self.merge_adapter = dirpath, merge_adapter

    def export_dir(self, trainer: L.Trainer) -> str:
        return self.dirpath or f"{trainer.default_root_dir}/export"

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        pl_module.save_pretrained(self.export_dir(trainer), merge_adapter=self.merge_adapter)
