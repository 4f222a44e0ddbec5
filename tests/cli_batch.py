"""Runs several `lightning-align` commands in one process, one after another, so the CLI tests pay the start-up
(torch, Lightning, transformers, W&B imports) once: each command in its own folder, where its exit code and
everything it logged are written (`exit_code`, `stderr.txt`).

    python tests/cli_batch.py jobs.json    # [{"cwd": "...", "args": ["fit", "--config", ...]}, ...]
"""

import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path


def run_one(cwd: Path, args: list[str]) -> int:
    from lightning_align.cli import main

    cwd.mkdir(parents=True, exist_ok=True)
    os.chdir(cwd)
    sys.argv = ["lightning-align", *args]  # as the command line would have it
    with open(cwd / "stderr.txt", "w") as log, contextlib.redirect_stderr(log):
        handler = logging.StreamHandler(log)  # Lightning's own handler keeps the original stderr
        loggers = [logging.getLogger(), logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")]
        for logger in loggers:
            logger.addHandler(handler)
        try:
            main()  # reads sys.argv, as the installed command does
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc(file=log)
            code = 1
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
            import wandb

            if wandb.run is not None:  # each command's offline run is its own
                wandb.finish()
            wandb.teardown()  # W&B's settings keep the first folder they saw: a new command starts them afresh
    (cwd / "exit_code").write_text(str(code))
    return code


if __name__ == "__main__":
    for job in json.loads(Path(sys.argv[1]).read_text()):
        run_one(Path(job["cwd"]), job["args"])
