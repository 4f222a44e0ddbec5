"""Fine-tune and align Hugging Face causal LMs the Lightning way."""

import logging
import warnings

# Messages of our dependencies about each other that a user of this library cannot act on, printed on every run:
# bitsandbytes' optional faster 4-bit CPU kernel (fetched from the hub, so never here), transformers' and
# Lightning's deprecations of names that peft and Lightning themselves still use, and Lightning's advert.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)

# Last: the demos register their bundled names (`lightning_align.assets`); no library module imports them.
from lightning_align import demos  # noqa: E402, F401
from lightning_align.callbacks import (  # noqa: E402
    ExportPretrained,
    GenerationSamples,
    LastCheckpoint,
    LoRA,
    MemoryReport,
    QLoRA,
    StepProgressBar,
)
from lightning_align.data import (  # noqa: E402
    DataError,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    UnpairedPreferenceDataModule,
)
from lightning_align.modules import (  # noqa: E402
    AlignModule,
    DPOModule,
    GRPOModule,
    KTOModule,
    ORPOModule,
    PPOModule,
    RewardModule,
    RLOOModule,
    SFTModule,
)
from lightning_align.modules.fsdp2 import FSDP2Strategy, register_strategy  # noqa: E402

register_strategy()  # `Trainer(strategy="fsdp2")`, `--trainer.strategy fsdp2`

__version__ = "0.1.0.dev0"
__all__ = [
    "AlignModule",
    "DPOModule",
    "DataError",
    "ExportPretrained",
    "FSDP2Strategy",
    "GRPOModule",
    "KTOModule",
    "GenerationSamples",
    "LastCheckpoint",
    "LoRA",
    "MemoryReport",
    "ORPOModule",
    "PPOModule",
    "PreferenceDataModule",
    "PromptDataModule",
    "QLoRA",
    "RLOOModule",
    "RewardModule",
    "SFTDataModule",
    "SFTModule",
    "StepProgressBar",
    "UnpairedPreferenceDataModule",
]
