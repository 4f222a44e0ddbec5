from lightning_align.data.base import AlignDataModule, load_tokenizer
from lightning_align.data.preference import PreferenceDataModule
from lightning_align.data.prompts import PromptDataModule
from lightning_align.data.sft import SFTDataModule
from lightning_align.data.sources import DataError, read_rows
from lightning_align.data.unpaired import UnpairedPreferenceDataModule

__all__ = [
    "AlignDataModule",
    "DataError",
    "PreferenceDataModule",
    "PromptDataModule",
    "SFTDataModule",
    "UnpairedPreferenceDataModule",
    "load_tokenizer",
    "read_rows",
]
