"""Fine-tune and align Hugging Face causal LMs the Lightning way."""

import logging

# bitsandbytes says on import, on some CPUs, that an optional faster 4-bit kernel could not be fetched from the
# hub: nothing a user of this library has to act on, and it printed on every run, QLoRA or not.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from lightning_align.callbacks import (  # noqa: E402
    ExportPretrained,
    GenerationSamples,
    LastCheckpoint,
    LoRA,
    QLoRA,
    StepProgressBar,
)
from lightning_align.data import DataError, PreferenceDataModule, PromptDataModule, SFTDataModule  # noqa: E402
from lightning_align.modules import AlignModule, DPOModule, PPOModule, RewardModule, SFTModule  # noqa: E402

__version__ = "0.1.0.dev0"
__all__ = [
    "AlignModule",
    "DPOModule",
    "DataError",
    "ExportPretrained",
    "GenerationSamples",
    "LastCheckpoint",
    "LoRA",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "QLoRA",
    "RewardModule",
    "SFTDataModule",
    "SFTModule",
    "StepProgressBar",
]
