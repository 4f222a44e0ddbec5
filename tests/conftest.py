import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from lightning_align.demos import tiny_model_path

    os.environ["LIGHTNING_ALIGN_HOME"] = str(tmp_path_factory.mktemp("cache"))
    return str(tiny_model_path())


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict:
    from lightning_align.demos import write_task_data

    return write_task_data(tmp_path_factory.mktemp("tasks"), n_train=2000, n_val=200)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer(tmp_path, **kwargs):
    import lightning as L

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@pytest.fixture(scope="session")
def sft_model(tiny_model, task_files, tmp_path_factory) -> str:
    """The tiny model after SFT on the demo tasks (about 25% held-out accuracy): the start of later stages."""
    import lightning as L

    from lightning_align import SFTDataModule, SFTModule

    root = tmp_path_factory.mktemp("sft")
    L.seed_everything(0)
    module = SFTModule(tiny_model, learning_rate=3e-3, warmup_steps=30)
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=32, max_length=64)
    trainer(root, max_steps=600).fit(module, datamodule=dm)
    return str(module.save_pretrained(root / "model"))
