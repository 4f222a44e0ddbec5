"""Fine-tune and align Hugging Face causal LMs the Lightning way."""

from lightning_align.callbacks import ExportPretrained, GenerationSamples, LoRA, QLoRA
from lightning_align.data import DataError, PreferenceDataModule, PromptDataModule, SFTDataModule
from lightning_align.modules import AlignModule, DPOModule, PPOModule, RewardModule, SFTModule

__version__ = "0.1.0.dev0"
__all__ = [
    "AlignModule",
    "DPOModule",
    "DataError",
    "ExportPretrained",
    "GenerationSamples",
    "LoRA",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "QLoRA",
    "RewardModule",
    "SFTDataModule",
    "SFTModule",
]
