"""Names for the bundled demo assets, so configs can use them like hub names: the tiny model as
`lightning-align/tiny-llama` and the demo task files as `demo:<file>` (for example `demo:sft_train`).
Both are built locally on first use into the cache folder; nothing is downloaded. Registered with
`lightning_align.assets` when the package loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lightning_align.assets import register_data, register_model
from lightning_align.data.sources import DataError
from lightning_align.demos.calculator import write_calculator_data
from lightning_align.demos.tasks import write_task_data
from lightning_align.demos.tiny import cache_dir, tiny_model_path

DEMO_MODEL = "lightning-align/tiny-llama"
DEMO_DATA_PREFIX = "demo:"
KINDS = ("sft", "preference", "prompts", "calculator_sft", "calculator_prompts")
DEMO_FILES = tuple(f"{kind}_{split}" for kind in KINDS for split in ("train", "val"))
DATA_VERSION = "v3"


def demo_data_file(name: str) -> str:
    """The demo task file `name` (written once, mixed-style SFT data)."""
    if name not in DEMO_FILES:
        source = DEMO_DATA_PREFIX + name
        raise DataError(f"{source}: no such demo file; valid: {', '.join(DEMO_DATA_PREFIX + f for f in DEMO_FILES)}")
    folder = cache_dir() / f"demo-data-{DATA_VERSION}"
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".demo-data-"))
        write_task_data(staging, verbose_share=0.5)
        write_calculator_data(staging)
        try:
            os.rename(staging, folder)  # atomic: concurrent first uses see the whole folder or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder / f"{name}.jsonl")


register_model(DEMO_MODEL, tiny_model_path)
register_data(DEMO_DATA_PREFIX, demo_data_file)
