"""Run by the FSDP2 tests as a script (Lightning relaunches it once per extra process):

    python fsdp_run.py OUT_DIR DEVICES

On 2 devices each case (SFT, reward model, DPO, ORPO, KTO) trains sharded (Lightning's ModelParallelStrategy: FSDP2
over a data-parallel mesh of 2), on 1 device unsharded, 3 steps with a global batch of 8 (4 per process on 2),
exporting at the end. Rank 0 saves the whole trained weights (gathered from the shards), the logged losses and
the validation metric to OUT_DIR/<case>-<devices>.pt. On 2 devices it then records what is refused at start
(OUT_DIR/refused.pt).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_align import (
    DPOModule,
    ExportPretrained,
    KTOModule,
    LoRA,
    ORPOModule,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
    UnpairedPreferenceDataModule,
)
from lightning_align.demos.assets import DEMO_MODEL
from lightning_align.modules.sharding import full_state_dict, is_sharded

CASES = ["sft", "sft-lora", "reward", "dpo", "dpo-ipo-lora", "orpo", "kto"]


class LoggedLosses(L.Callback):
    """The `train/loss` each step logs, and (unsharded) the weights training starts from."""

    def __init__(self):
        self.values = []
        self.initial = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(trainer.callback_metrics["train/loss"].item())


def trainer(devices: int, run: Path, callbacks=(), **parallel) -> L.Trainer:
    parallel = parallel or {"data_parallel_size": devices, "tensor_parallel_size": 1}
    strategy = ModelParallelStrategy(**parallel) if devices > 1 else "auto"
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=3,
        limit_val_batches=2,
        val_check_interval=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
        default_root_dir=str(run),
    )


def sft_data(devices: int) -> SFTDataModule:
    return SFTDataModule(DEMO_MODEL, "demo:sft_train", "demo:sft_val", batch_size=8 // devices, max_length=64)


def case(name: str, devices: int):
    """The module, its data (a global batch of 8 rows or pairs) and the validation metric to compare."""
    if name.startswith("sft"):
        return SFTModule(DEMO_MODEL, learning_rate=1e-3), sft_data(devices), "val/loss"
    if name == "kto":
        data = UnpairedPreferenceDataModule(
            DEMO_MODEL, "demo:preference_train", "demo:preference_val", batch_size=8 // devices, max_length=64
        )
        return KTOModule(DEMO_MODEL, learning_rate=1e-3), data, "val/loss"
    data = preference_data(devices)
    if name == "reward":
        return RewardModule(DEMO_MODEL, learning_rate=1e-3), data, "val/accuracy"
    if name == "orpo":
        return ORPOModule(DEMO_MODEL, learning_rate=1e-3), data, "val/loss"
    loss_type = "ipo" if "ipo" in name else "sigmoid"
    return DPOModule(DEMO_MODEL, loss_type=loss_type, learning_rate=1e-3), data, "val/rewards/margins"


def preference_data(devices: int) -> PreferenceDataModule:
    return PreferenceDataModule(
        DEMO_MODEL, "demo:preference_train", "demo:preference_val", batch_size=8 // devices, max_length=64
    )


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    for name in CASES:
        L.seed_everything(0)
        run = out / name / str(devices)
        callbacks = [LoRA(r=4, save_dir=str(run / "adapter"))] if name.endswith("lora") else []
        callbacks.append(ExportPretrained(str(run / "export"), merge_adapter=False))
        losses = LoggedLosses()
        callbacks.append(losses)
        fit = trainer(devices, run, callbacks)
        module, data, metric = case(name, devices)
        fit.fit(module, datamodule=data)
        sharded = is_sharded(module.model)
        weights = full_state_dict(module.model) if sharded else module.model.state_dict()
        if fit.is_global_zero:
            trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in module.model.named_parameters()}
            torch.save(
                {
                    "weights": {k: v.detach().clone() for k, v in weights.items()},
                    "trainable": sorted(n for n in trainable if "lora_" in n or not name.endswith("lora")),
                    "val": fit.callback_metrics[metric].item(),
                    "losses": losses.values,
                    "initial": losses.initial,
                    "sharded": sharded,
                    "world_size": fit.world_size,
                },
                out / f"{name}-{devices}.pt",
            )
    if devices == 1:
        return
    refused = {}
    attempts = {
        "ppo": lambda: (
            PPOModule(DEMO_MODEL, reward="lightning_align.demos:task_reward", max_new_tokens=4),
            PromptDataModule(DEMO_MODEL, "demo:prompts_train", batch_size=4),
            {},
        ),
        "dpo_precomputed": lambda: (DPOModule(DEMO_MODEL, precompute_ref_logps=True), preference_data(devices), {}),
        # Lightning's defaults: every process on the tensor-parallel axis
        "tensor_parallel": lambda: (
            SFTModule(DEMO_MODEL),
            sft_data(devices),
            {"data_parallel_size": 1, "tensor_parallel_size": 2},
        ),
    }
    for what, make in attempts.items():
        module, data, options = make()
        try:
            trainer(devices, out / "refused" / what, **options).fit(module, datamodule=data)
            refused[what] = None
        except ValueError as err:
            refused[what] = str(err)
    if L.fabric.utilities.rank_zero_only.rank == 0:
        torch.save(refused, out / "refused.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
