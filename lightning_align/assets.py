"""Names that resolve to assets built on this machine, so configs can use them like hub names (the demos register
the tiny model as `lightning-align/tiny-llama` and their task files as `demo:<file>`; nothing is downloaded), and
what to tell a user when a model name loads from nowhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

MODELS: dict[str, Callable[[], str | Path]] = {}  # name -> builds (once) and returns its folder
DATA: dict[str, Callable[[str], str | Path]] = {}  # prefix -> the file for the name after it


def register_model(name: str, build: Callable[[], str | Path]) -> None:
    MODELS[name] = build


def register_data(prefix: str, resolve: Callable[[str], str | Path]) -> None:
    DATA[prefix] = resolve


def resolve_model(name_or_path):
    """The local folder behind a registered model name; any other name or path unchanged."""
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return str(MODELS[name_or_path]())
    return name_or_path


def resolve_data(source):
    """The file behind a registered `<prefix><name>` data name; anything else unchanged."""
    if isinstance(source, str):
        for prefix, resolve in DATA.items():
            if source.startswith(prefix):
                return str(resolve(source[len(prefix) :]))
    return source


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
