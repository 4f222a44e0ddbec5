from lightning_align.modules.base import AlignModule
from lightning_align.modules.dpo import DPOModule
from lightning_align.modules.ppo import PPOModule
from lightning_align.modules.reward import RewardModule
from lightning_align.modules.sft import SFTModule

__all__ = ["AlignModule", "DPOModule", "PPOModule", "RewardModule", "SFTModule"]
