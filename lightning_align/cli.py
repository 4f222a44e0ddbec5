"""`lightning-align fit --config x.yaml`: LightningCLI over the library's modules, data modules and callbacks
(`validate` measures the validation metrics of a model or checkpoint without training).
`lightning-align plan --config x.yaml`: the run's predicted peak memory per device (`lightning_align.plan`).

Modules and data modules are chosen by `class_path` (any `AlignModule` / `AlignDataModule`, ours or a user's),
callbacks and loggers as in any LightningCLI. Errors in what the user gave (a bad value, a missing file, an
unknown option of ours) end with one clear line, not a stack trace; set LIGHTNING_ALIGN_TRACEBACK=1 to see it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from lightning_align.callbacks.checkpoints import LastCheckpoint
from lightning_align.callbacks.memory import MemoryReport
from lightning_align.callbacks.progress import StepProgressBar
from lightning_align.data.base import AlignDataModule
from lightning_align.data.sources import DataError
from lightning_align.modules.base import AlignModule
from lightning_align.modules.signal import NoLearningSignal


class LoggedConfig(SaveConfigCallback):
    """Writes `config.yaml` next to the logs, as LightningCLI does, and logs the whole run config (model, data,
    adapter and other callbacks, trainer) to every logger, so a W&B run shows what produced it."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.as_dict()
        config.pop("config", None)  # the paths of the files it was read from
        for logger in trainer.loggers:
            logger.log_hyperparams({"run": config})


class AlignArgumentParser(LightningArgumentParser):
    """Config mistakes end in one line naming the key, not the usage text and a nest of union errors."""

    def error(self, message: str, ex=None):
        if not self.exit_on_error:  # a nested parser: its caller handles the exception (unions try the next type)
            super().error(message, ex)
        print(f"lightning-align: error: {one_line(message)}", file=sys.stderr)
        raise SystemExit(2)


def one_line(message: str) -> str:
    """The part of a jsonargparse error that names the key and what is wrong with it."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    problem = next((i for i, line in enumerate(lines) if line.startswith("- Problem with given class_path")), None)
    if problem is None and "Errors:" in lines:  # a union of types: the first type's own error is the one meant
        return lines[lines.index("Errors:") + 1].removeprefix("- ")
    if problem is None:
        return " ".join(lines[:3])
    key = re.search(r'Parser key "([^"]+)"', lines[0])
    class_path = re.search(r"class_path '([^']+)'", lines[problem])
    detail = []
    for line in lines[problem + 1 :]:
        if line.startswith(("- ", "Given value")):
            break
        detail.append(line.rstrip(":"))
    where = ", ".join(m.group(1) for m in (key, class_path) if m)
    return f"{where}: {' '.join(detail)}"


class AlignCLI(LightningCLI):
    """LightningCLI whose `--ckpt_path` resumes the run the config describes: the config's module class and every
    value given in it or on the command line stay as they are (LightningCLI would replace the whole `model:`
    section, class included, with the checkpoint's hyperparameters). A checkpoint of another method, model or
    adapter is refused when it loads (`AlignModule.check_same_run`); differing values are listed once."""

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            AlignModule,
            AlignDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=LoggedConfig,
            save_config_kwargs={"overwrite": True},
            parser_class=AlignArgumentParser,
            args=args,
            run=run,
        )

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # The bar counts optimiser steps where max_steps bounds the run, unless the config has no bar or its own.
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in [*given, *callbacks]
        ):
            callbacks = [*callbacks, StepProgressBar()]
        # Planned vs measured peak memory at the end of training, unless the config brings its own MemoryReport.
        if not any(isinstance(c, MemoryReport) for c in [*given, *callbacks]):
            callbacks = [*callbacks, MemoryReport()]
        return super()._instantiate_trainer(config, callbacks)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # The modules have no test_step or forward: `test` and `predict` would only fail, so they are not offered.
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def before_fit(self) -> None:
        # Before the config is saved over the earlier run's: a new run into a folder holding another's checkpoint.
        for callback in self.trainer.callbacks:
            if isinstance(callback, LastCheckpoint):
                callback.check_new_run(self.trainer, self.config["fit"].get("ckpt_path"))

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path:
            return
        # A distributed checkpoint (sharded strategies) is a folder; its meta.pt holds what is not weights.
        path = Path(ckpt_path) / "meta.pt" if Path(ckpt_path).is_dir() else Path(ckpt_path)
        if not path.is_file():
            return
        import torch

        saved = torch.load(path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        given = self.config[subcommand].get("model", {}).get("init_args", {})
        changed = [
            f"{key}: {saved[key]!r} -> {value!r}"
            for key, value in sorted(given.items())
            if key in saved and not key.startswith("_") and as_saved(saved[key]) != as_saved(value)
        ]
        if changed:
            print(
                f"lightning-align: resuming with the config's values, which differ from the checkpoint's: "
                f"{', '.join(changed)}",
                file=sys.stderr,
            )


def as_saved(value):
    """A config value as a checkpoint holds it (tuples come back as lists)."""
    return [as_saved(v) for v in value] if isinstance(value, (list, tuple)) else value


USER_ERRORS = (DataError, FileNotFoundError, FileExistsError, ValueError, NoLearningSignal)


def main(args: list[str] | None = None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["plan"]:  # the memory planner: reads the same config, builds no weights
            from lightning_align.plan import main as plan

            return plan(argv[1:])
        AlignCLI(args)
    except USER_ERRORS as err:
        if os.environ.get("LIGHTNING_ALIGN_TRACEBACK"):
            raise
        print(f"lightning-align: error: {one_line(str(err))}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
