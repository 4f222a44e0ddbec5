"""What a run is to the planner (`RunSpec`, from a `fit` config or a live run) and what it predicts (`Plan`)."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lightning_align.modules.checkpointing import checkpointing_mode
from lightning_align.plan.formulas import (
    ALLOCATOR_SLACK,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    MIB,
    NCCL_BUFFER_BYTES,
    gib,
)

MODULE_METHODS = {
    "SFTModule": "sft",
    "RewardModule": "reward",
    "DPOModule": "dpo",
    "ORPOModule": "orpo",
    "KTOModule": "kto",
    "PPOModule": "ppo",
    "GRPOModule": "grpo",
}
REFERENCE_FREE_DPO = {"simpo", "orpo", "sft"}


@dataclass
class RunSpec:
    """What sets a run's memory. `model`: a folder with `config.json`, or the file itself."""

    model: str | object  # a folder, its config.json, or a transformers config
    method: str = "sft"
    adapter: str | None = None  # "lora" or "qlora"
    r: int = 8
    target_modules: str | list[str] = "all-linear"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    precision: str = "32-true"
    torch_dtype: str | None = None  # the module's own `torch_dtype` (the weights' dtype as loaded)
    strategy: str = "auto"
    devices: int = 1
    gradient_checkpointing: bool | str = False  # as the module's: False, True / "full", "selective"
    micro_batch: int = 8
    max_length: int = 1024
    uses_reference: bool = True
    precompute_ref_logps: bool = False
    scoring_check: str = "fallback"
    max_new_tokens: int = 128
    episode_tokens: int | None = None  # multi-turn episodes: the environment's max_tokens (all turns, its own too)
    num_generations: int = 1
    minibatch_size: int | None = None
    reward_model: str | None = None
    critic: str | None = None
    accelerator: str = "cuda"  # "cpu": gloo's collectives hold a temporary copy (plan/sharded.py)

    @property
    def rows(self) -> int:
        """Rows of the training forward: preference methods score chosen and rejected rows together."""
        if self.method in ("dpo", "orpo", "reward"):
            return 2 * self.micro_batch
        if self.method in ("ppo", "grpo"):
            return self.minibatch_size or self.micro_batch * self.num_generations
        return self.micro_batch

    @property
    def response_tokens(self) -> int:
        """An online row's tokens after its prompt: one completion's, or a whole episode's (every turn's)."""
        return self.episode_tokens or self.max_new_tokens

    @property
    def sequence(self) -> int:
        """Tokens per training row: online methods learn on prompt (max_length) + response tokens."""
        return self.max_length + (self.response_tokens if self.method in ("ppo", "grpo") else 0)

    @property
    def reference_forward(self) -> bool:
        return self.uses_reference and not self.precompute_ref_logps and self.method in ("dpo", "kto", "ppo", "grpo")

    @property
    def checkpointing(self) -> str | None:
        """ "full", "selective" or None."""
        return checkpointing_mode(self.gradient_checkpointing)

    @property
    def response_description(self) -> str:
        if self.episode_tokens:
            return f" + {self.episode_tokens} per episode"
        return f" + {self.max_new_tokens} generated"

    def describe(self) -> str:
        adapter = f"{self.adapter} r={self.r}" if self.adapter else "no adapter"
        return (
            f"{self.method}, {adapter}, {self.precision}, strategy {self.strategy} x {self.devices} device(s), "
            f"micro-batch {self.micro_batch} x {self.max_length} tokens"
            + (self.response_description if self.method in ("ppo", "grpo") else "")
            + (f", {self.checkpointing} gradient checkpointing" if self.checkpointing else "")
            + (", precomputed reference log-probs" if self.precompute_ref_logps else "")
        )


@dataclass
class Plan:
    """Predicted bytes per device, by part; `peak` is what `torch.cuda.max_memory_allocated` should read."""

    spec: RunSpec
    parts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    weights_by_dtype: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    setup: int = 0  # sharded runs: host memory of each process while it loads the whole model and shards it

    @property
    def peak(self) -> int:
        return sum(self.parts.values())

    @property
    def cuda_overhead(self) -> int:
        """What a CUDA device holds beyond the tensors: context, cuBLAS workspaces, NCCL buffers (several devices)."""
        return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + (NCCL_BUFFER_BYTES if self.spec.devices > 1 else 0)

    def device_total(self, cuda: bool = True) -> int:
        """The peak plus, on a CUDA device, the overheads above and the allocator's slack: what it must hold."""
        return int(self.peak * (1 + ALLOCATOR_SLACK) + self.cuda_overhead) if cuda else self.peak

    def fits(self, device_memory: int) -> bool:
        return self.device_total() <= device_memory

    def table(self) -> str:
        lines = [f"plan for {self.spec.describe()}"]
        lines.append(
            f"  parameters: {self.total_params:,} ({self.trainable_params:,} trainable); weights by dtype: "
            + ", ".join(f"{dtype} {gib(n)}" for dtype, n in sorted(self.weights_by_dtype.items()))
        )
        width = max(len(name) for name in self.parts)
        for name, n in self.parts.items():
            lines.append(f"  {name:<{width}}  {gib(n):>10}")
        if self.setup:
            lines.append(f"  {'set-up (host memory)':<{width}}  {gib(self.setup):>10}  (whole, then sharded)")
        lines.append(f"  {'peak per device':<{width}}  {gib(self.peak):>10}")
        lines.append(
            f"  {'with CUDA context and slack':<{width}}  {gib(self.device_total()):>10}"
            f"  (+{self.cuda_overhead // MIB} MiB context and library buffers, +{ALLOCATOR_SLACK:.0%} allocator slack)"
        )
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def parse_bytes(text: str) -> int:
    """'24GiB', '80GB', '24G' or a number of bytes."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"device memory {text!r}: expected a size such as 24GiB or 80GB")
    number, prefix, unit = match.groups()
    power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
    base = 1000 if unit.upper() == "B" and prefix else 1024
    size = int(float(number) * base**power)
    if size <= 0:
        raise ValueError(f"device memory {text!r}: must be more than 0")
    return size


def at_least(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def load_config(model: str):
    from transformers import AutoConfig

    from lightning_align.assets import resolve_model

    if not isinstance(model, (str, Path)):
        return model  # already a config
    path = Path(resolve_model(model))
    if path.is_file():
        if path.name == "config.json":
            _config_values(path)
            return AutoConfig.from_pretrained(path.parent)
        return _config_file(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{model}: no config.json there; give a model folder or its config.json")
    _config_values(path / "config.json")  # a clear error for a broken file, before transformers reads it
    return AutoConfig.from_pretrained(path)


def _config_values(path: Path) -> dict:
    """A model config file's values; a file that is not a JSON object with a `model_type` is refused by name."""
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" at line {err.lineno}, column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise ValueError(f"{path}: not a valid JSON model config ({getattr(err, 'msg', err)}{where})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{path}: a model config is a JSON object with a 'model_type' (as config.json files are)")
    return values


def _config_file(path: Path):
    from transformers import AutoConfig

    values = _config_values(path)
    return AutoConfig.for_model(values.pop("model_type"), **values)


# ----- from a `fit` config -------------------------------------------------------------------------------------
def spec_from_config(path: str | Path, **overrides) -> RunSpec:
    """The RunSpec of a `lightning-align fit` config file; `overrides` (RunSpec fields) win."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    model = config.get("model", {})
    module = model.get("class_path", "lightning_align.SFTModule").rsplit(".", 1)[-1]
    if module not in MODULE_METHODS:
        raise ValueError(f"{path}: model.class_path {module}: the planner knows {', '.join(MODULE_METHODS)}")
    args = model.get("init_args", {})
    data = config.get("data", {}).get("init_args", {})
    trainer = config.get("trainer", {})
    values = {
        "model": args.get("model") or args.get("policy") or data.get("tokenizer"),
        "method": MODULE_METHODS[module],
        "precision": str(trainer.get("precision", "32-true")),
        "strategy": trainer.get("strategy", "auto") if isinstance(trainer.get("strategy", "auto"), str) else "auto",
        "devices": trainer.get("devices", 1) if isinstance(trainer.get("devices", 1), int) else 1,
        "gradient_checkpointing": args.get("gradient_checkpointing", False),
        "torch_dtype": args.get("torch_dtype"),
        "micro_batch": data.get("batch_size", 8),
        "max_length": data.get("max_length", 1024),
        "precompute_ref_logps": bool(args.get("precompute_ref_logps") or args.get("ref_cache_dir")),
        "scoring_check": args.get("scoring_check", "fallback"),
        "max_new_tokens": args.get("max_new_tokens", 128),
        "episode_tokens": episode_tokens(args.get("environment")),
        "num_generations": args.get("num_generations", 1),
        "minibatch_size": args.get("minibatch_size"),
        "critic": args.get("critic"),
    }
    loss_types = args.get("loss_type", "sigmoid")
    loss_types = loss_types if isinstance(loss_types, list) else [loss_types]
    if module == "DPOModule" and all(kind in REFERENCE_FREE_DPO for kind in loss_types) or module == "ORPOModule":
        values["uses_reference"] = False
    if module == "GRPOModule" and not args.get("beta"):
        values["uses_reference"] = args.get("advantage") == "reinforce++"
    reward = args.get("reward")
    rewards = reward if isinstance(reward, list) else [reward]
    folders = [r for r in rewards if isinstance(r, str) and ":" not in r and (Path(r) / "config.json").exists()]
    values["reward_model"] = folders[0] if folders else None
    for callback in trainer.get("callbacks", []) or []:
        name = str(callback.get("class_path", "")).rsplit(".", 1)[-1] if isinstance(callback, dict) else ""
        if name in ("LoRA", "QLoRA"):
            init = callback.get("init_args", {})
            values.update(adapter=name.lower(), r=init.get("r", 8))
            values["target_modules"] = init.get("target_modules", "all-linear")
            if name == "QLoRA":
                values["double_quant"] = init.get("double_quant", True)
                values["compute_dtype"] = init.get("compute_dtype", "bfloat16")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunSpec(**values)


def spec_from_run(trainer, module, datamodule=None) -> RunSpec:
    """The RunSpec of a live run: its module, adapter callback, precision, strategy and data settings."""
    from lightning_align.scoring.model import unwrapped

    method = next((MODULE_METHODS[c.__name__] for c in type(module).__mro__ if c.__name__ in MODULE_METHODS), None)
    if method is None:
        raise ValueError(f"the planner does not know {type(module).__name__}")
    values = {"model": module.model_name_or_path or unwrapped(module.model).config, "method": method}
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if name in ("LoRA", "QLoRA"):
            values.update(adapter=name.lower(), r=callback.r, target_modules=callback.target_modules)
            if name == "QLoRA":
                values.update(double_quant=callback.double_quant, compute_dtype=callback.compute_dtype)
    strategy = type(trainer.strategy).__name__
    deepspeed = getattr(trainer.strategy, "config", None) or {}  # DeepSpeedStrategy's config dict
    stage = deepspeed.get("zero_optimization", {}).get("stage") if isinstance(deepspeed, dict) else None
    known = {"DDPStrategy": "ddp", "FSDPStrategy": "fsdp", "ModelParallelStrategy": "fsdp", "FSDP2Strategy": "fsdp"}
    values["strategy"] = known.get(strategy, f"deepspeed_stage_{stage}" if strategy == "DeepSpeedStrategy" else "auto")
    values.update(devices=trainer.world_size, precision=str(trainer.precision), torch_dtype=module.torch_dtype)
    values["accelerator"] = trainer.strategy.root_device.type
    values["gradient_checkpointing"] = module.gradient_checkpointing
    datamodule = datamodule or getattr(trainer, "datamodule", None)
    if datamodule is not None:
        values.update(micro_batch=datamodule.batch_size, max_length=datamodule.max_length)
    # Called after configure_model, before the module's own on_fit_start (which may release a precomputed one).
    values["uses_reference"] = getattr(module, "reference", None) is not None
    values["precompute_ref_logps"] = bool(getattr(module, "precompute_ref_logps", False))
    if getattr(module, "scoring", None) is not None:
        values["scoring_check"] = module.scoring.check
    for name in ("num_generations", "minibatch_size"):
        if getattr(module, name, None) is not None:
            values[name] = getattr(module, name)
    if "max_new_tokens" in getattr(module, "sampling", {}):
        values["max_new_tokens"] = module.sampling["max_new_tokens"]
    if getattr(module, "environment", None) is not None:
        values["episode_tokens"] = module.environment.max_tokens
    return RunSpec(**values)


def episode_tokens(environment) -> int | None:
    """A config's environment's `max_tokens` (its class's default when not given), or None without one."""
    if not isinstance(environment, dict):
        return None
    given = (environment.get("init_args") or {}).get("max_tokens")
    if given is not None:
        return int(given)
    import importlib
    import inspect

    module, _, name = str(environment.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"model.init_args.environment.class_path {environment.get('class_path')!r}: {error}") from None
    default = inspect.signature(cls).parameters.get("max_tokens")
    if default is not None and default.default is not inspect.Parameter.empty:
        return int(default.default)
    return int(cls.max_tokens)
