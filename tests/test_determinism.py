"""The determinism guard: the library reproduces a run exactly where it claims to (same seed, same thread count:
the same losses and the same sampled tokens), and another thread count changes results only at float level, which
the learning tests must (and do, see benchmarks/learning_spread.py) tolerate."""

import lightning as L
import pytest
import torch

from lightning_align import GRPOModule, SFTDataModule, SFTModule
from tests.conftest import task_prompts, trainer


@pytest.fixture
def threads():
    """Set the thread count for one run; restored after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


class Losses(L.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(outputs["loss"].item())


def sft_losses(tiny_model, task_files, tmp_path, seed=0) -> list[float]:
    L.seed_everything(seed)
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=16, max_length=64, seed=seed)  # the order
    losses = Losses()
    trainer(tmp_path, max_steps=6, callbacks=[losses]).fit(SFTModule(tiny_model, learning_rate=3e-3), datamodule=dm)
    return losses.values


def rollout_tokens(tiny_model, task_files, tmp_path, seed=0) -> torch.Tensor:
    from tests.conftest import ready
    from tests.modules.test_grpo import varied_reward

    module = ready(GRPOModule(tiny_model, rewards=varied_reward, num_generations=4, max_new_tokens=8), [], tmp_path)
    dm = task_prompts(tiny_model, task_files, batch_size=8)
    L.seed_everything(seed)
    return module.rollout(dm.collate(dm.train_set[:8]))["sequences"]


def test_same_seed_and_threads_reproduce_exactly_other_threads_only_at_float_level(
    tiny_model, task_files, tmp_path, threads
):
    runs = {}
    for count in (1, 2):
        threads(count)
        runs[count] = [sft_losses(tiny_model, task_files, tmp_path / f"{count}-{i}") for i in range(2)]
        assert runs[count][0] == runs[count][1]  # bit for bit
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[2][0]), rtol=1e-4, atol=0)
    assert runs[1][0][-1] < 0.9 * runs[1][0][0]  # it trained, so the comparison is of a moving run
    reordered = sft_losses(tiny_model, task_files, tmp_path / "seed-1", seed=1)  # the seed orders the data
    assert reordered != runs[2][0]


def test_sampled_rollouts_reproduce_with_the_same_seed_and_threads(tiny_model, task_files, tmp_path, threads):
    for count in (1, 2):
        threads(count)
        first, second = (rollout_tokens(tiny_model, task_files, tmp_path / f"{count}-{i}") for i in range(2))
        assert torch.equal(first, second)
    assert not torch.equal(first, rollout_tokens(tiny_model, task_files, tmp_path / "seed-1", seed=1))
