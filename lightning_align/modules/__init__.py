from lightning_align.modules.base import AlignModule
from lightning_align.modules.dpo import DPOModule
from lightning_align.modules.grpo import GRPOModule
from lightning_align.modules.kto import KTOModule
from lightning_align.modules.online import OnlineRLModule
from lightning_align.modules.orpo import ORPOModule
from lightning_align.modules.ppo import PPOModule
from lightning_align.modules.reward import RewardModule
from lightning_align.modules.rewards import Rewards
from lightning_align.modules.rloo import RLOOModule
from lightning_align.modules.sft import SFTModule

__all__ = [
    "AlignModule",
    "DPOModule",
    "GRPOModule",
    "KTOModule",
    "ORPOModule",
    "OnlineRLModule",
    "PPOModule",
    "RLOOModule",
    "RewardModule",
    "Rewards",
    "SFTModule",
]
