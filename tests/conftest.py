import os

import pytest
import torch

# The learning tests and the trained fixtures seed with TEST_SEED (0 unless set): benchmarks/learning_spread.py runs
# them over other seeds and thread counts, as other machines would, and tabulates the gains they print.
TEST_SEED = int(os.environ.get("LIGHTNING_ALIGN_TEST_SEED", "0"))
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))


def report_gain(before: float, after: float, note: str = "") -> None:
    """Print a learning test's measurement before and after training, in the line learning_spread.py reads."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    print(f"\nGAIN {test} {before:.4f} {after:.4f} {note}".rstrip())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from lightning_align.demos import tiny_model_path

    os.environ["LIGHTNING_ALIGN_HOME"] = str(tmp_path_factory.mktemp("cache"))
    return str(tiny_model_path())


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> dict:
    """Demo task data whose SFT part mixes two answer styles; the preference data prefers the bare answer."""
    from lightning_align.demos import write_task_data

    return write_task_data(tmp_path_factory.mktemp("tasks"), n_train=2000, n_val=200, verbose_share=0.5)


@pytest.fixture(scope="session")
def plain_task_files(tmp_path_factory) -> dict:
    """Demo task data with one answer style, for measuring what SFT alone learns."""
    from lightning_align.demos import write_task_data

    return write_task_data(tmp_path_factory.mktemp("plain-tasks"), n_train=2000, n_val=200)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    from lightning_align.demos.architectures import tiny_model_folder

    return lambda name: str(tiny_model_folder(name, root))


def random_examples(vocab_size: int, lengths=(30, 14, 11, 9, 20, 12), seed=0) -> list[dict]:
    """Random-token rows longer and shorter than the grid's sliding window, prompts unscored."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(7, vocab_size, (n,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return examples


def padded(examples):
    from lightning_align.data.collate import pad_collate

    return pad_collate(examples, pad_token_id=0)


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


def task_prompts(model, task_files, batch_size=8, **options):
    """The demo task's plain prompts (no chat template), set up for fit."""
    from lightning_align import PromptDataModule

    dm = PromptDataModule(
        model,
        task_files["prompts_train"],
        task_files["prompts_val"],
        batch_size=batch_size,
        apply_chat_template=False,
        **options,
    )
    dm.setup("fit")
    return dm


def ready(module, callbacks=(), tmp_path=None):
    """A module set up by a real Trainer (adapters applied, reference placed) without training it."""
    fit = trainer(tmp_path, max_steps=0, callbacks=list(callbacks))
    fit.strategy.connect(module)
    module.trainer = fit
    module.configure_model()
    module.on_fit_start()
    return module


@pytest.fixture(scope="session")
def sft_model(tiny_model, task_files, tmp_path_factory) -> str:
    """The tiny model after SFT on the mixed-style demo data: about 80% of its greedy answers are verbose, and about
    12% of them are the bare right answer. The start of the preference and RL stages."""
    import lightning as L

    from lightning_align import SFTDataModule, SFTModule

    root = tmp_path_factory.mktemp("sft")
    L.seed_everything(TEST_SEED)
    module = SFTModule(tiny_model, learning_rate=3e-3, warmup_steps=30)
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=32, max_length=64)
    trainer(root, max_steps=600).fit(module, datamodule=dm)
    return str(module.save_pretrained(root / "model"))


@pytest.fixture(scope="session")
def sft_adapter(tiny_model, task_files, tmp_path_factory) -> str:
    """A LoRA adapter exported by a short SFT run on the tiny model: the start of multi-stage adapter runs."""
    import lightning as L

    from lightning_align import LoRA, SFTDataModule, SFTModule

    root = tmp_path_factory.mktemp("sft-adapter")
    L.seed_everything(0)
    module = SFTModule(tiny_model, learning_rate=1e-2)
    dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=16, max_length=64)
    trainer(root, max_steps=30, callbacks=[LoRA(r=4, save_dir=str(root / "adapter"))]).fit(module, datamodule=dm)
    return str(root / "adapter")
