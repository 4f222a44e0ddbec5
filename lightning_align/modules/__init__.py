from lightning_align.modules.base import AlignModule
from lightning_align.modules.sft import SFTModule

__all__ = ["AlignModule", "SFTModule"]
