"""The main job on the bundled tiny model: supervised fine-tuning on the demo tasks, with before/after numbers.

Run with `make demo`. Everything is built locally (tiny Llama-style model, character tokenizer, task data);
nothing is downloaded.
"""

import json
from pathlib import Path

import lightning as L

from lightning_align import SFTDataModule, SFTModule
from lightning_align.demos import task_accuracy, tiny_model_path, write_task_data

RUN_DIR = Path("runs/demo")


def main() -> None:
    L.seed_everything(0)
    model_path = str(tiny_model_path())
    data = write_task_data(RUN_DIR / "data")
    held_out = [json.loads(line)["prompt"] for line in open(data["sft_val"])][:200]

    datamodule = SFTDataModule(model_path, data["sft_train"], data["sft_val"], batch_size=32, max_length=64)
    sft = SFTModule(model_path, learning_rate=3e-3, warmup_steps=30)
    trainer = L.Trainer(
        max_steps=800,
        val_check_interval=200,
        check_val_every_n_epoch=None,
        limit_val_batches=4,
        default_root_dir=RUN_DIR / "sft",
        accelerator="cpu",
    )
    sft.configure_model()
    accuracy_before = task_accuracy(sft.model, datamodule.tokenizer, held_out)
    trainer.validate(sft, datamodule=datamodule, verbose=False)
    loss_before = trainer.callback_metrics["val/loss"].item()
    trainer.fit(sft, datamodule=datamodule)
    loss_after = trainer.callback_metrics["val/loss"].item()
    accuracy_after = task_accuracy(sft.model, datamodule.tokenizer, held_out)
    export = sft.save_pretrained(RUN_DIR / "sft" / "model")

    print("\nSFT on the demo tasks (sort digits, reverse a word, add two numbers), held-out prompts:")
    print(f"{'metric':<28}{'before':>10}{'after':>10}")
    print(f"{'validation loss':<28}{loss_before:>10.3f}{loss_after:>10.3f}")
    print(f"{'task accuracy (greedy)':<28}{accuracy_before:>10.1%}{accuracy_after:>10.1%}")
    print(f"\nSFT model saved to {export}")


if __name__ == "__main__":
    main()
