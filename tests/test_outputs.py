"""The export contract: an export writes only its own files, never over what the user has, and a kill in the
middle leaves what was there before as it was; a run writes only where its docs say."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_align import ExportPretrained, LastCheckpoint, LoRA, SFTDataModule, SFTModule
from lightning_align.outputs import MANIFEST, OutputInTheWay, holds_only_an_export
from tests.conftest import ready, trainer


@pytest.fixture(scope="module")
def module(tiny_model, tmp_path_factory):
    return ready(SFTModule(tiny_model), [], tmp_path_factory.mktemp("module"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file and link under `folder` with its content (a link: where it points)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(folder))] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(folder))] = p.read_bytes()
    return out


def user_files(folder: Path) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    (folder / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (folder / "README.md").write_text("my project")


def test_a_folder_with_the_users_files_is_refused_and_left_as_it_was(module, tmp_path):
    user_files(tmp_path / "my_project")
    before = snapshot(tmp_path / "my_project")
    with pytest.raises(OutputInTheWay, match=r"not empty: it holds README.md, data, notes.txt.*overwrite=True"):
        module.save_pretrained(tmp_path / "my_project")
    assert snapshot(tmp_path / "my_project") == before


def test_overwrite_writes_only_the_exports_files_beside_the_users(module, tmp_path):
    folder = tmp_path / "my_project"
    user_files(folder)
    (folder / "config.json").write_text("{}")  # a file an export writes: replaced, as asked
    before = snapshot(folder)
    module.save_pretrained(folder, overwrite=True)
    after = snapshot(folder)
    for name in ("notes.txt", "data/train.jsonl", "README.md"):
        assert after[name] == before[name]
    assert after["config.json"] != before["config.json"] and "model.safetensors" in after
    assert not [p for p in folder.iterdir() if ".partial-" in p.name]


def test_a_path_that_is_a_file_is_refused_even_with_overwrite(module, tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"weights")
    for overwrite in (False, True):
        with pytest.raises(OutputInTheWay, match="that path is a file"):
            module.save_pretrained(target, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"] and target.read_bytes() == b"weights"


def test_new_and_empty_folders_and_links_to_them_are_written(module, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "empty").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name in ("new/nested", "empty", "link"):
        folder = module.save_pretrained(tmp_path / name)
        assert holds_only_an_export(folder)
        AutoModelForCausalLM.from_pretrained(folder)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "config.json").is_file()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputInTheWay, match="a link to nothing"):
        module.save_pretrained(tmp_path / "dangling")


def test_a_previous_export_is_refused_then_replaced_on_request_without_its_stale_files(module, tmp_path):
    folder = module.save_pretrained(tmp_path / "export")
    (folder / "extra_weights.safetensors").write_bytes(b"x")  # as if the earlier export had written it
    manifest = folder / MANIFEST
    listed = manifest.read_text().replace('"files": [', '"files": [\n  "extra_weights.safetensors",')
    manifest.write_text(listed)
    with pytest.raises(OutputInTheWay, match=r"not empty \(an earlier export\)"):
        module.save_pretrained(folder)
    (folder / "mine.txt").write_text("keep")
    module.save_pretrained(folder, overwrite=True)
    assert not (folder / "extra_weights.safetensors").exists() and (folder / "mine.txt").read_text() == "keep"


def test_the_run_folder_itself_keeps_its_checkpoints_and_logs(tiny_model, plain_task_files, tmp_path):
    import lightning as L

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=32)

    def run(**overwrite):
        callbacks = [LastCheckpoint(**overwrite), ExportPretrained(dirpath=str(tmp_path), **overwrite)]
        logger = L.pytorch.loggers.CSVLogger(tmp_path, name="logs", version=0)
        fit = trainer(tmp_path, max_steps=2, callbacks=callbacks, enable_checkpointing=True, logger=logger)
        fit.fit(SFTModule(tiny_model), datamodule=dm)
        return fit

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
    with pytest.raises(OutputInTheWay, match="not empty"):  # refused before training, not after it
        run()
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run's"
    run(overwrite=True)
    assert (tmp_path / "checkpoints" / "last.ckpt").stat().st_size > 1000
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "logs" / "version_0" / "hparams.yaml").is_file()


KILLED_SAVE = """
import os, sys, time
from pathlib import Path
from lightning_align import SFTModule
from tests.conftest import ready
module = ready(SFTModule(sys.argv[1]), [], Path(sys.argv[2]).parent / "run")
real = module.model.save_pretrained
def slow(folder, **kwargs):
    real(folder, **kwargs)
    print("written", flush=True)
    time.sleep(60)
module.model.save_pretrained = slow
module.save_pretrained(sys.argv[2], overwrite=sys.argv[3] == "1")
"""


@pytest.mark.parametrize("place", ["new folder", "earlier export and the user's files"])
def test_kill_9_in_the_middle_of_an_export_leaves_what_was_there(module, tiny_model, tmp_path, place):
    folder = tmp_path / "export"
    if place != "new folder":
        module.save_pretrained(folder)
        user_files(folder)
    before = snapshot(folder) if folder.exists() else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE, tiny_model, str(folder), "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert child.stdout.readline().strip() == "written"  # the export's files are on disk, not yet in place
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    if before is None:
        assert not folder.exists()
    else:
        assert {k: v for k, v in snapshot(folder).items() if ".partial-" not in k} == before


def test_a_run_without_a_root_folder_writes_only_lightnings_folders(tiny_model, plain_task_files, tmp_path):
    import lightning as L

    dm = SFTDataModule(tiny_model, plain_task_files["sft_train"], batch_size=4, max_length=32)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        fit = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            callbacks=[LoRA(r=2), ExportPretrained()],
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=L.pytorch.loggers.CSVLogger("."),
        )
        fit.fit(SFTModule(tiny_model), datamodule=dm)
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_logs"]
    version = tmp_path / "lightning_logs" / "version_0"
    assert (version / "checkpoints" / "adapter" / "adapter_config.json").is_file()
    assert (version / "checkpoints" / "export" / "config.json").is_file()
