"""The run's planned peak memory per device next to the measured one, at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

GIB = 2**30


def resident_bytes(field: str) -> int | None:
    """`VmRSS` (now) or `VmHWM` (the peak since the last reset) of this process, from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_resident_peak() -> bool:
    """Start VmHWM afresh from the current resident set (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class MemoryReport(L.Callback):
    """Plans the run's peak memory per device when it starts (`lightning_align.plan`, from the model's config, the
    adapter callback, precision, strategy and the data module's batch size and max_length) and measures the real
    peak when training ends: `torch.cuda.max_memory_allocated` on a GPU; on a CPU the peak resident memory above
    what the process held before the model was built. Logs `memory/planned_gib` and `memory/measured_gib` and says
    both in one line. The plan is for batches of rows as long as max_length; shorter batches measure less.

    Args:
        plan: False to measure only (the plan takes a few seconds at start).
    """

    def __init__(self, plan: bool = True):
        self.plan_enabled = plan
        self.plan = None
        self.baseline = 0
        self.cuda = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        self.cuda = trainer.strategy.root_device.type == "cuda"
        if not self.cuda:
            self.baseline = resident_bytes("VmRSS") or 0  # before the model is built

    def on_fit_start(self, trainer, pl_module) -> None:
        # From here: the model is built. Loading it may briefly hold more (a CPU maps the whole file in), which is
        # host memory on a GPU and not the run's peak: the peak is counted from now.
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        elif not reset_resident_peak():
            self.baseline = 0
        if not self.plan_enabled:
            return
        from lightning_align.plan import plan_run, spec_from_run

        try:
            self.plan = plan_run(spec_from_run(trainer, pl_module))
        except Exception as err:  # a plan is a report, never a reason to stop a run
            rank_zero_info(f"MemoryReport: no plan for this run ({type(err).__name__}: {err})")
            return
        rank_zero_info(f"MemoryReport: {self.plan.table()}")

    def measured(self, trainer) -> int | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated(trainer.strategy.root_device)
        peak = resident_bytes("VmHWM")
        return None if peak is None or not self.baseline else peak - self.baseline

    def on_train_end(self, trainer, pl_module) -> None:
        measured = self.measured(trainer)
        metrics = {}
        if measured is not None:
            metrics["memory/measured_gib"] = measured / GIB
        if self.plan is not None:
            metrics["memory/planned_gib"] = self.plan.peak / GIB
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        what = (
            "max_memory_allocated" if self.cuda else f"peak resident memory over {self.baseline / GIB:.2f} GiB at setup"
        )
        planned = f"planned {self.plan.peak / GIB:.3f} GiB" if self.plan is not None else "no plan"
        seen = f"measured {measured / GIB:.3f} GiB ({what})" if measured is not None else "not measured here"
        ratio = f"; measured / planned = {measured / self.plan.peak:.2f}" if measured and self.plan else ""
        rank_zero_info(f"MemoryReport: peak memory per device: {planned}, {seen}{ratio}")
