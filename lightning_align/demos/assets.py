"""Names for the bundled demo assets, so configs can use them like hub names: the tiny model as
`lightning-align/tiny-llama` and the demo task files as `demo:<file>` (for example `demo:sft_train`).
Both are built locally on first use into the cache folder; nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL = "lightning-align/tiny-llama"
DEMO_DATA_PREFIX = "demo:"
DEMO_FILES = tuple(f"{kind}_{split}" for kind in ("sft", "preference", "prompts") for split in ("train", "val"))
DATA_VERSION = "v1"


def resolve_model(name_or_path):
    """The local folder of the tiny demo model for its name; any other name or path unchanged."""
    if name_or_path == DEMO_MODEL:
        from lightning_align.demos.tiny import tiny_model_path

        return str(tiny_model_path())
    return name_or_path


def resolve_data(source):
    """The file behind a `demo:<file>` name (written once, mixed-style SFT data); anything else unchanged."""
    if not (isinstance(source, str) and source.startswith(DEMO_DATA_PREFIX)):
        return source
    from lightning_align.data.sources import DataError
    from lightning_align.demos.tasks import write_task_data
    from lightning_align.demos.tiny import cache_dir

    name = source[len(DEMO_DATA_PREFIX) :]
    if name not in DEMO_FILES:
        raise DataError(f"{source}: no such demo file; valid: {', '.join(DEMO_DATA_PREFIX + f for f in DEMO_FILES)}")
    folder = cache_dir() / f"demo-data-{DATA_VERSION}"
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".demo-data-"))
        write_task_data(staging, verbose_share=0.5)
        try:
            os.rename(staging, folder)  # atomic: concurrent first uses see the whole folder or none
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return str(folder / f"{name}.jsonl")


def hub_problem(name_or_path: str) -> str | None:
    """Why a name that is no local folder cannot load, found in about a second (transformers' own retries take
    most of a minute offline), or None when it may load: a local path, offline mode or a cached copy, or a model
    the Hugging Face hub knows."""
    import os
    from pathlib import Path

    local = Path(name_or_path).exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local or os.environ.get("HF_HUB_OFFLINE"):  # a folder (present or not), or the hub not to be asked
        return None
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        if any(
            isinstance(try_to_load_from_cache(name_or_path, f), str) for f in ("config.json", "tokenizer_config.json")
        ):
            return None
        HfApi().model_info(name_or_path, timeout=5)
    except RepositoryNotFoundError:
        return "there is no such folder here, and the Hugging Face hub has no model of that name (private or misspelt)"
    except Exception:  # noqa: BLE001 - no network, a bad name for the hub: either way it cannot load from there
        return "there is no such folder here, and the Hugging Face hub could not be reached for it (offline?)"
    return None


def why_not_loaded(name_or_path: str, err: Exception) -> str:
    """What a user can act on when a model or tokenizer does not load: a local folder that lacks the files, or a
    name that is neither a folder here nor a model the Hugging Face hub gave (offline, private or misspelt)."""
    from pathlib import Path

    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(name_or_path).is_dir():
        return f"the folder exists but this could not be read from it ({first_line})"
    return (
        "there is no such folder here, and no model of that name could be fetched from the Hugging Face hub "
        "(offline, private or misspelt)"
    )
