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
