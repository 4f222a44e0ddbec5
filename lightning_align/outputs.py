"""Where a run's outputs go, and how an export folder is written: only its own files, never over the user's.

The export contract (`save_pretrained`, `ExportPretrained`, the LoRA callback's adapter folder):
- a new path, or an empty folder: the export is written beside it and renamed into place when complete, so a
  crash while saving leaves nothing half-written under that name;
- a folder that holds anything: refused, naming what is there, unless `overwrite=True`; then only the files an
  export writes are replaced (and the files of the previous export that this one does not write are removed, as
  its manifest lists them), and nothing else in the folder is touched;
- a path that is a file: refused, whatever `overwrite` says.
Every export folder carries a manifest (`MANIFEST`) of the files it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = ".lightning-align-export.json"
SHOWN_ENTRIES = 5


class OutputInTheWay(FileExistsError):
    """The place an output would be written holds something it did not write."""


def export_manifest(folder: Path) -> list[str] | None:
    """The files a previous export wrote into `folder` (relative paths), or None if it holds no export."""
    try:
        return list(json.loads((Path(folder) / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def holds_only_an_export(folder: Path) -> bool:
    """Whether everything in `folder` was written by an earlier export: its manifest lists every file, or a
    subfolder holds an export of its own (the LoRA callback's `merged` beside its adapter)."""
    folder = Path(folder)
    listed = export_manifest(folder)
    if listed is None:
        return False
    for entry in folder.iterdir():
        if entry.name == MANIFEST or entry.name in listed:
            continue
        if entry.is_dir() and not entry.is_symlink():
            inside = [str(p.relative_to(folder)) for p in entry.rglob("*") if not p.is_dir()]
            if set(inside) <= set(listed) or holds_only_an_export(entry):
                continue
        return False
    return True


def check_export_target(path: str | Path, overwrite: bool = False, what: str = "export") -> None:
    """Raise `OutputInTheWay` when an export to `path` would touch what it did not write (see the module doc)."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise OutputInTheWay(f"{what} to '{path}': that path is a link to nothing; remove it or choose another path")
    if path.exists() and not path.is_dir():
        raise OutputInTheWay(
            f"{what} to '{path}': that path is a file; an export is a folder. Choose another path (nothing was "
            "written, and the file is left as it is)"
        )
    if overwrite or not path.is_dir():
        return
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    shown = ", ".join(entries[:SHOWN_ENTRIES]) + (
        f" and {len(entries) - SHOWN_ENTRIES} more" if len(entries) > SHOWN_ENTRIES else ""
    )
    earlier = " (an earlier export)" if holds_only_an_export(path) else ""
    raise OutputInTheWay(
        f"{what} to '{path}': the folder is not empty{earlier}: it holds {shown}. Choose another folder, or pass "
        "overwrite=True to replace only the files an export writes (everything else there is left as it is)"
    )


@contextmanager
def export_folder(path: str | Path, overwrite: bool = False, what: str = "export") -> Iterator[Path]:
    """A staging folder to write an export into; when the block ends without error its files are put at `path`
    by the export contract, and the staging folder is removed (also on error, leaving `path` as it was)."""
    path = Path(path)
    check_export_target(path, overwrite, what)
    fresh = not path.is_dir()
    place = path.parent if fresh else path
    place.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=place, prefix=f".{path.name}.partial-"))
    try:
        yield staging
        written = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        (staging / MANIFEST).write_text(json.dumps({"files": written}, indent=1) + "\n")
        if fresh:
            staging.rename(path)  # the whole folder appears at once
        else:
            move_files_into(staging, path, written, export_manifest(path) or [])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_files_into(staging: Path, folder: Path, written: list[str], previous: list[str]) -> None:
    """Put the export's files into an existing folder one rename each; the manifest last, so a folder whose
    manifest names this export holds all of it."""
    for name in written:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, target)
    for name in set(previous) - set(written):  # files of the earlier export this one does not write
        stale = folder / name
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
    os.replace(staging / MANIFEST, folder / MANIFEST)


def given_root(trainer) -> Path | None:
    """The trainer's `default_root_dir` when one was given (Lightning's default is the current directory)."""
    root = Path(trainer.default_root_dir)
    return None if root.resolve() == Path.cwd().resolve() else root


def run_output_dir(trainer, name: str) -> Path:
    """Where a run's `name` output (the adapter, the export) goes when the user names no folder:
    `<default_root_dir>/<name>` where a root was given; else beside Lightning's own outputs (the checkpoint
    folder's `<name>`, or the logger's version folder), never loose in the current directory."""
    root = given_root(trainer)
    if root is not None:
        return root / name
    checkpoints = getattr(trainer.checkpoint_callback, "dirpath", None)
    if checkpoints:
        return Path(checkpoints) / name
    if trainer.loggers and trainer.log_dir:
        return Path(trainer.log_dir) / name
    return Path("lightning_logs") / name


def may_replace(trainer, folder: Path, overwrite: bool) -> bool:
    """Whether an end-of-training save may write over what `folder` holds: when told to, or when a resumed run
    replaces an export that an earlier part of it wrote there (and nothing else)."""
    return overwrite or (trainer.ckpt_path is not None and folder.is_dir() and holds_only_an_export(folder))


def output_places(trainer) -> list[str]:
    """Where this run writes what a user keeps: checkpoints, and what the callbacks that write into folders of
    their own name (`output_place`: exports, adapters)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    places = []
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            places.append(f"checkpoints in {callback.dirpath}")
        elif hasattr(callback, "output_place"):
            places.append(callback.output_place(trainer))
    return places


def report_output_places(trainer, when: str) -> None:
    from lightning.pytorch.utilities import rank_zero_info

    places = output_places(trainer)
    if places:
        rank_zero_info(f"{when}: " + "; ".join(places))
