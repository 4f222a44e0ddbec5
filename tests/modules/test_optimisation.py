"""The optimiser step: gradients live only within their step (across its accumulated micro-batches), in every
module that Lightning's automatic optimisation steps."""

import lightning as L
import pytest

import lightning_align as la
from tests.conftest import trainer

MODULES = {
    "sft": (la.SFTModule, la.SFTDataModule, "sft_train"),
    "reward": (la.RewardModule, la.PreferenceDataModule, "preference_train"),
    "dpo": (la.DPOModule, la.PreferenceDataModule, "preference_train"),
    "kto": (la.KTOModule, la.UnpairedPreferenceDataModule, "preference_train"),
    "orpo": (la.ORPOModule, la.PreferenceDataModule, "preference_train"),
}


class GradientsAtForward(L.Callback):
    """Whether any weight holds a gradient when each micro-batch's forward starts."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(any(p.grad is not None for p in module.parameters()))


@pytest.mark.parametrize("method", MODULES)
def test_no_forward_of_a_new_step_sees_the_last_steps_gradients(tiny_model, task_files, tmp_path, method):
    module_class, data_class, data = MODULES[method]
    dm = data_class(tiny_model, task_files[data], batch_size=2, max_length=48)
    seen = GradientsAtForward()
    fit = trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[seen])
    fit.fit(module_class(tiny_model), datamodule=dm)
    # Each step's second micro-batch adds to the first one's gradients; a new step starts with none.
    assert seen.seen == [False, True] * 3
