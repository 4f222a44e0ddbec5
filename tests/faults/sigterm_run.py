"""Child process of the SIGTERM test: SFT on the demo data, printing each step's loss as it goes.

python sigterm_run.py OUT_DIR MAX_STEPS [CHECKPOINT_TO_RESUME]
"""

import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from lightning_align import SFTDataModule, SFTModule
from lightning_align.demos.assets import DEMO_MODEL


class PrintLoss(L.Callback):
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        print(f"step {trainer.global_step} loss {trainer.callback_metrics['train/loss'].item():.8f}", flush=True)
        time.sleep(0.3)  # time for the parent to send its signal mid-training


def main(out: str, max_steps: int, resume: str | None) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[PrintLoss(), OnExceptionCheckpoint(dirpath=out)],  # written when SIGTERM stops the run
    )
    data = SFTDataModule(DEMO_MODEL, "demo:sft_train", batch_size=8, max_length=64)
    trainer.fit(SFTModule(DEMO_MODEL, learning_rate=1e-3), datamodule=data, ckpt_path=resume)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
