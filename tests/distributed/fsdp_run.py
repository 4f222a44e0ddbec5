"""Run by the FSDP2 tests as a script (Lightning relaunches it once per extra process):

    python fsdp_run.py OUT_DIR DEVICES
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R ... fsdp_run.py OUT_DIR nodes

On 2 devices each case (SFT, reward model, DPO, ORPO, KTO) trains sharded (Lightning's ModelParallelStrategy: FSDP2
over a data-parallel mesh of 2), on 1 device unsharded, 3 steps with a global batch of 8 (4 per process on 2),
exporting at the end. Rank 0 saves the whole trained weights (gathered from the shards), the logged losses and
the validation metric to OUT_DIR/<case>-<devices>.pt. On 2 devices it then records what is refused at start
(OUT_DIR/refused.pt).
"""

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_align import (
    DPOModule,
    ExportPretrained,
    GRPOModule,
    KTOModule,
    LastCheckpoint,
    LoRA,
    ORPOModule,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    QLoRA,
    RewardModule,
    SFTDataModule,
    SFTModule,
    UnpairedPreferenceDataModule,
)
from lightning_align.demos.assets import DEMO_MODEL
from lightning_align.modules.sharding import full_state_dict, is_sharded

# A frozen reference copy and AdamW states; sampling that must continue where it was; a checkpoint without the
# frozen base (LoRA's, which also writes the adapter beside it from every process's shards).
RESUMED = ["dpo", "grpo", "sft-lora"]
CASES = [
    "sft",
    "sft-lora",
    "sft-qlora",
    "sft-bf16-mixed",
    "reward",
    "reward-lora",
    "dpo",
    "dpo-ipo-lora",
    "orpo",
    "orpo-lora",
    "kto",
    "kto-lora",
]
CASES += ["ppo", "ppo-lora", "ppo-reward-model", "grpo", "grpo-lora"]
REWARD_MODEL = "reward-model"  # a folder under OUT_DIR, made by the test before the runs (a sequence classifier)


class LoggedLosses(L.Callback):
    """The `train/loss` each step logs, and (unsharded) the weights training starts from."""

    def __init__(self):
        self.values = []
        self.initial = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size == 1:
            self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        online = getattr(pl_module, "logged_rollout", None)  # PPO and GRPO: the rollout batch's statistics
        self.values.append(dict(online) if online else trainer.callback_metrics["train/loss"].item())


class Unproven(SFTModule):
    """A user's own method, not shown equal to one process when sharded."""

    shards_proven = False


def trainer(
    devices: int, run: Path, callbacks=(), max_steps: int = 3, num_nodes: int = 1, precision="32-true", **parallel
) -> L.Trainer:
    parallel = parallel or {"data_parallel_size": devices * num_nodes, "tensor_parallel_size": 1}
    strategy = ModelParallelStrategy(**parallel) if devices * num_nodes > 1 else "auto"
    if num_nodes > 1:  # our short name: every process on the data-parallel axis, found by itself
        strategy = "fsdp2"
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=max_steps,
        limit_val_batches=2,
        val_check_interval=3,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=list(callbacks),
        default_root_dir=str(run),
    )


def sft_data(devices: int) -> SFTDataModule:
    return SFTDataModule(DEMO_MODEL, "demo:sft_train", "demo:sft_val", batch_size=8 // devices, max_length=64)


def case(name: str, devices: int, out: Path = Path()):
    """The module, its data (a global batch of 8 rows or pairs) and the validation metric to compare."""
    if name.startswith("sft"):
        return SFTModule(DEMO_MODEL, learning_rate=1e-3), sft_data(devices), "val/loss"
    if name.startswith("kto"):
        data = UnpairedPreferenceDataModule(
            DEMO_MODEL, "demo:preference_train", "demo:preference_val", batch_size=8 // devices, max_length=64
        )
        return KTOModule(DEMO_MODEL, learning_rate=1e-3), data, "val/loss"
    if name.startswith(("ppo", "grpo")):
        return online_case(name, devices, out)
    data = preference_data(devices)
    if name.startswith("reward"):
        return RewardModule(DEMO_MODEL, learning_rate=1e-3), data, "val/accuracy"
    if name.startswith("orpo"):
        return ORPOModule(DEMO_MODEL, learning_rate=1e-3), data, "val/loss"
    loss_type = "ipo" if "ipo" in name else "sigmoid"
    return DPOModule(DEMO_MODEL, loss_type=loss_type, learning_rate=1e-3), data, "val/rewards/margins"


def digit_share(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that differs between the untrained model's samples (the task's own is 0 for nearly all of them)."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def online_case(name: str, devices: int, out: Path):
    """PPO with its value head on the policy (a global rollout batch of 8) and GRPO with a sharded reference copy
    (beta > 0), the batch's reward std and DAPO's token mean (4 prompts x 4 samples): statistics of the whole
    batch, which each process must compute over every process's rows."""
    reward = "tests.distributed.fsdp_run:digit_share"  # a path, not the function: checkpoints load it safely
    if name.endswith("reward-model"):  # scored by a reward model, sharded like the policy
        reward = str(out / REWARD_MODEL)
    if name.startswith("ppo"):
        prompts = 8 // devices
        module = PPOModule(
            DEMO_MODEL, reward=reward, max_new_tokens=6, minibatch_size=prompts, ppo_epochs=1, learning_rate=1e-3
        )
    else:
        prompts = 4 // devices
        module = GRPOModule(
            DEMO_MODEL,
            rewards=reward,
            num_generations=4,
            beta=0.04,
            scale_rewards="batch",
            loss_aggregation="dapo",
            max_new_tokens=6,
            learning_rate=1e-3,
        )
    return (
        module,
        PromptDataModule(DEMO_MODEL, "demo:prompts_train", "demo:prompts_val", batch_size=prompts),
        "val/reward",
    )


def preference_data(devices: int) -> PreferenceDataModule:
    return PreferenceDataModule(
        DEMO_MODEL, "demo:preference_train", "demo:preference_val", batch_size=8 // devices, max_length=64
    )


def weight_gathers_per_rollout(module, data) -> tuple[int, int, int]:
    """(FSDP2 weight gathers during one rollout batch's sampling, tokens sampled per row, sharded units)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    batch = next(iter(data.train_dataloader()))
    gather, calls = dist.all_gather_single, []
    dist.all_gather_single = lambda *args, **kwargs: calls.append(1) or gather(*args, **kwargs)
    try:
        sequences = module.generate(batch)
    finally:
        dist.all_gather_single = gather
    units = sum(isinstance(m, FSDPModule) for m in module.model.modules())
    return len(calls), sequences.shape[1] - batch["input_ids"].shape[1], units


def main(out: Path, devices: int) -> None:
    torch.set_num_threads(1)
    for name in CASES:
        L.seed_everything(0)
        run = out / name / str(devices)
        adapter = QLoRA if name.endswith("qlora") else LoRA  # QLoRA: its 4-bit weights whole on every process
        callbacks = [adapter(r=4, save_dir=str(run / "adapter"))] if name.endswith("lora") else []
        callbacks.append(ExportPretrained(str(run / "export"), merge_adapter=False))
        if name == "sft-lora":  # the adapter merged into a whole copy of the gathered weights, too
            callbacks.append(ExportPretrained(str(run / "merged"), merge_adapter=True))
        losses = LoggedLosses()
        callbacks.append(losses)
        fit = trainer(devices, run, callbacks, precision="bf16-mixed" if name.endswith("bf16-mixed") else "32-true")
        module, data, metric = case(name, devices, out)
        fit.fit(module, datamodule=data)
        sharded = is_sharded(module.model)
        weights = full_state_dict(module.model) if sharded else module.model.state_dict()
        gathers = weight_gathers_per_rollout(module, data) if sharded and name == "ppo" else None
        if fit.is_global_zero:
            trainable = {n.replace("_fsdp_wrapped_module.", "") for n, p in module.model.named_parameters()}
            torch.save(
                {
                    "weights": {k: v.detach().clone() for k, v in weights.items()},
                    "trainable": sorted(n for n in trainable if "lora_" in n or not name.endswith("lora")),
                    "val": fit.callback_metrics[metric].item(),
                    "losses": losses.values,
                    "initial": losses.initial,
                    "sharded": sharded,
                    "world_size": fit.world_size,
                    "precision": type(fit.precision_plugin).__name__ + " " + str(fit.precision),
                    "gathers": gathers,
                    # how each network was scored, and whether the first batch checked it (agreed by all processes)
                    "plans": [(plan.packing, plan.output_layer) for plan in module.scoring.plans.values()],
                    "checked": list(module.scoring.checked.values()),
                    "reward_model_sharded": any(
                        is_sharded(scorer.module.model)
                        for scorer in getattr(getattr(module, "rewards", None), "functions", None) or []
                        if hasattr(scorer, "module")
                    ),
                },
                out / f"{name}-{devices}.pt",
            )
    if devices == 1:
        return
    refused = {}
    attempts = {
        "unproven": lambda: (Unproven(DEMO_MODEL), sft_data(devices), {}),
        "dpo_precomputed": lambda: (DPOModule(DEMO_MODEL, precompute_ref_logps=True), preference_data(devices), {}),
        # Lightning's defaults: every process on the tensor-parallel axis
        "tensor_parallel": lambda: (
            SFTModule(DEMO_MODEL),
            sft_data(devices),
            {"data_parallel_size": 1, "tensor_parallel_size": 2},
        ),
    }
    for what, make in attempts.items():
        module, data, options = make()
        try:
            trainer(devices, out / "refused" / what, **options).fit(module, datamodule=data)
            refused[what] = None
        except ValueError as err:
            refused[what] = str(err)
    if L.fabric.utilities.rank_zero_only.rank == 0:
        torch.save(refused, out / "refused.pt")
    for name in RESUMED:
        resume(out / "resume" / name, name)


def resume(run: Path, name: str) -> None:
    """4 sharded steps straight, leaving Lightning's distributed checkpoint of step 2, then a run resumed from it:
    rank 0 saves both runs' logged losses and final weights to <run>.pt. Both keep `last.ckpt` and the export in
    the same folders, as a resumed run does (refused before the first step unless it is known to resume)."""
    results = {}
    for part, ckpt in [("straight", None), ("resumed", run / "steps" / "epoch=0-step=2.ckpt")]:
        L.seed_everything(0)
        losses = LoggedLosses()
        callbacks = [losses, LastCheckpoint(str(run / "last")), ExportPretrained(str(run / "export"))]
        callbacks += [LoRA(r=4, save_dir=str(run / "adapter"))] if name.endswith("lora") else []
        if ckpt is None:
            callbacks.append(ModelCheckpoint(run / "steps", every_n_train_steps=2, save_top_k=-1))
        fit = trainer(2, run / part, callbacks, max_steps=4)
        module, data, _ = case(name, 2)
        fit.fit(module, datamodule=data, ckpt_path=ckpt)
        weights = full_state_dict(module.model)
        results[part] = {"losses": losses.values, "weights": {k: v.clone() for k, v in weights.items()}}
    if L.fabric.utilities.rank_zero_only.rank == 0:
        results["checkpoint_is_sharded"] = (run / "steps" / "epoch=0-step=2.ckpt").is_dir()  # distributed format
        torch.save(results, run.with_suffix(".pt"))


def two_nodes(out: Path) -> None:
    """The SFT case as 2 nodes x 1 process, each node started by its own `torchrun --nnodes 2` (Lightning's
    multi-node path), under the "fsdp2" strategy: rank 0 saves the logged losses and the weights to
    OUT_DIR/sft-nodes.pt."""
    torch.set_num_threads(1)
    L.seed_everything(0)
    losses = LoggedLosses()
    fit = trainer(1, out / "nodes", [losses], num_nodes=2)
    module, data, _ = case("sft", 2)  # a global batch of 8: 4 per process
    fit.fit(module, datamodule=data)
    weights = full_state_dict(module.model)
    if fit.is_global_zero:
        strategy = type(fit.strategy).__name__
        result = {"losses": losses.values, "weights": weights, "world_size": fit.world_size, "strategy": strategy}
        torch.save(result, out / "sft-nodes.pt")


if __name__ == "__main__":
    if sys.argv[2] == "nodes":
        two_nodes(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]), int(sys.argv[2]))
