"""`--trainer.strategy fsdp2`: Lightning's `ModelParallelStrategy` with every process on the data-parallel axis,
which is what the modules shard over (`modules/sharding.py`). Lightning's own defaults put every process on the
tensor-parallel axis instead, which the modules refuse."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy(data_parallel_size=<all processes>, tensor_parallel_size=1)`, whatever the number of
    devices and nodes; other arguments as Lightning's."""

    def __init__(self, **kwargs):
        kwargs.setdefault("tensor_parallel_size", 1)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # known only now: devices x nodes
            self._data_parallel_size = self.world_size // self._tensor_parallel_size
        super().setup_environment()


def register_strategy() -> None:
    """Make `Trainer(strategy="fsdp2")` (and `--trainer.strategy fsdp2`) name `FSDP2Strategy`."""
    if NAME not in StrategyRegistry:
        StrategyRegistry.register(NAME, FSDP2Strategy, description="FSDP2 over every process (lightning-align)")
