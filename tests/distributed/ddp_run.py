"""Run by the DDP tests as a script (Lightning's DDP relaunches it once per extra process):

    python ddp_run.py OUT_DIR DEVICES

Trains each case for 3 steps with a global batch of 8 (8 per process on 1 device, 4 on 2) and saves, from rank
0, the trained weights and the validation metric of each case to OUT_DIR/<case>-<devices>.pt.
"""

import os
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_align import (
    DPOModule,
    ExportPretrained,
    GenerationSamples,
    LoRA,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTDataModule,
    SFTModule,
)
from lightning_align.demos.assets import DEMO_MODEL

CASES = ["sft", "sft-lora", "reward", "dpo", "dpo-lora", "dpo-precomputed", "ppo-lora"]


def case(name: str, per_device: int):
    method = name.split("-")[0]
    if method == "sft":
        dm = SFTDataModule(DEMO_MODEL, "demo:sft_train", "demo:sft_val", batch_size=per_device, max_length=64)
        return SFTModule(DEMO_MODEL, learning_rate=1e-3), dm, "val/loss"
    if method in ("reward", "dpo"):
        dm = PreferenceDataModule(
            DEMO_MODEL, "demo:preference_train", "demo:preference_val", batch_size=per_device, max_length=64
        )
        module = (
            RewardModule(DEMO_MODEL, learning_rate=1e-3)
            if method == "reward"
            # precomputed: each process scores its share of the rows and all share the results
            else DPOModule(DEMO_MODEL, learning_rate=1e-3, precompute_ref_logps=name.endswith("precomputed"))
        )
        return module, dm, "val/accuracy" if method == "reward" else "val/rewards/margins"
    dm = PromptDataModule(DEMO_MODEL, "demo:prompts_train", "demo:prompts_val", batch_size=per_device)
    module = PPOModule(
        DEMO_MODEL,
        reward="lightning_align.demos:task_reward",
        max_new_tokens=6,
        minibatch_size=per_device,
        ppo_epochs=1,
        learning_rate=1e-3,
    )
    return module, dm, "val/reward"


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    for name in os.environ.get("DDP_CASES", ",".join(CASES)).split(","):
        L.seed_everything(0)
        module, dm, metric = case(name, 8 // devices)
        run = out / name / str(devices)  # each run's outputs in a folder of its own
        callbacks = [LoRA(r=4, save_dir=str(run / "adapter"))] if name.endswith("lora") else []
        callbacks += [ExportPretrained(str(run / "export"), merge_adapter=False)]
        callbacks += [GenerationSamples(every_n_steps=2, num_samples=4, max_new_tokens=4)] if name == "sft" else []
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            max_steps=3,
            limit_val_batches=2,  # 16 validation rows: the same on one process and split across two
            val_check_interval=3,
            num_sanity_val_steps=0,
            logger=L.pytorch.loggers.CSVLogger(out / name, name=str(devices)),
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=dm)
        weights = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        gathered = trainer.strategy.all_gather(torch.stack([w.float().sum() for w in weights.values()]))
        if trainer.is_global_zero:
            torch.save(
                {
                    "weights": weights,
                    "val": trainer.callback_metrics[metric].item(),
                    "ranks_agree": bool((gathered - gathered.reshape(-1, len(weights))[0]).abs().max() == 0),
                    "world_size": trainer.world_size,
                },
                out / f"{name}-{devices}.pt",
            )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
