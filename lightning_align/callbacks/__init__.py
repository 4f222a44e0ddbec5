from lightning_align.callbacks.checkpoints import LastCheckpoint
from lightning_align.callbacks.export import ExportPretrained
from lightning_align.callbacks.lora import LoRA, QLoRA
from lightning_align.callbacks.memory import MemoryReport
from lightning_align.callbacks.progress import StepProgressBar
from lightning_align.callbacks.samples import GenerationSamples

__all__ = [
    "ExportPretrained",
    "GenerationSamples",
    "LastCheckpoint",
    "LoRA",
    "MemoryReport",
    "QLoRA",
    "StepProgressBar",
]
