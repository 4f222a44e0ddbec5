"""The `lightning-align` CLI: every example config runs through it, logs its metrics and config to W&B (offline,
read back from the run files), --print_config round-trips, and config errors end in one clear line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.wandb_records import logged

CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))
SHORT_RUN = [
    "--trainer.max_steps=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.val_check_interval=1",  # PPO validates after its first rollout batch
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
]
METRICS = {  # what each module's issue says it logs
    "sft": ["train/loss", "val/loss", "val/perplexity", "train/tokens_per_sec"],
    "reward": ["train/loss", "val/accuracy", "val/margin"],
    "dpo": ["train/loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]
    + ["logps/chosen", "logps/rejected", "val/loss", "val/rewards/accuracies", "val/rewards/margins"],
    "ppo": ["train/reward/mean", "train/reward/std", "train/kl", "train/kl_coef", "train/entropy"]
    + ["train/policy/clipfrac", "train/policy/approx_kl", "train/loss/policy", "train/loss/value"]
    + ["train/response_length", "train/time/generate", "train/time/learn", "val/reward"],
    "kto": ["train/loss", "kl", "rewards/desirable", "rewards/undesirable", "val/loss", "val/rewards/margins"],
    "orpo": [
        "train/loss",
        "rewards/chosen",
        "rewards/accuracies",
        "log_odds_ratio",
        "log_odds_chosen",
        "val/loss",
        "val/log_odds_ratio",
    ]
    + ["val/rewards/accuracies"],
    "grpo": ["train/reward/mean", "train/reward/std", "train/loss", "train/entropy", "train/policy/clipfrac"]
    + ["train/groups/zero_std", "train/response_length", "train/time/generate", "train/time/learn", "val/reward"],
}


def cli(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}  # nothing comes from the hub
    return subprocess.run(
        [sys.executable, "-m", "lightning_align", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_home(tiny_model):
    return os.environ["LIGHTNING_ALIGN_HOME"]  # set by tiny_model: subprocesses reuse the built model and data


def batch_runs(root: Path, commands: dict[str, list[str]]) -> dict[str, tuple[int | None, str, Path]]:
    """Several commands run in one process (`cli_batch.py`), each in its folder under `root`: {name: (exit code,
    what it logged, its folder)}; the exit code is None for a command the process never finished."""
    import json

    jobs = [{"cwd": str(root / name), "args": args} for name, args in commands.items()]
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, str(Path(__file__).with_name("cli_batch.py")), str(root / "jobs.json")], env=env)
    runs = {}
    for name in commands:
        folder = root / name
        code = int((folder / "exit_code").read_text()) if (folder / "exit_code").exists() else None
        runs[name] = (code, (folder / "stderr.txt").read_text() if code is not None else "", folder)
    return runs


@pytest.fixture(scope="module")
def example_runs(demo_home, tmp_path_factory):
    """Every example config's short run."""
    commands = {c.stem: ["fit", "--config", str(c), *SHORT_RUN] for c in CONFIGS}
    return batch_runs(tmp_path_factory.mktemp("examples"), commands)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_example_config_runs_and_logs_its_metrics_and_config_to_wandb(config, example_runs):
    method, variant = config.stem.split("_")
    returncode, stderr, tmp_path = example_runs[config.stem]
    assert returncode == 0, stderr[-3000:] if returncode is not None else "the batch process stopped before it"
    (run_dir,) = (tmp_path / "runs" / config.stem / "wandb").glob("offline-run-*")
    config_logged, metrics = logged(run_dir)
    missing = [name for name in METRICS[method] if name not in metrics]
    assert not missing, f"not logged to W&B: {missing}"
    run = config_logged["run"]
    assert run["model"]["class_path"].endswith(config_logged["run"]["model"]["class_path"].split(".")[-1])
    assert (
        run["model"]["init_args"]["learning_rate"]
        == yaml.safe_load(config.read_text())["model"]["init_args"]["learning_rate"]
    )
    adapters = [cb["class_path"] for cb in run["trainer"]["callbacks"] if cb["class_path"].endswith("LoRA")]
    lora, qlora = ["lightning_align.LoRA"], ["lightning_align.QLoRA"]
    assert adapters == {"full": [], "lora": lora, "qlora": qlora, "tools": lora}[variant]
    if variant == "tools":  # the episodes' own metrics
        assert {"train/episodes/tool_calls", "train/episodes/turns", "train/tokens/environment"} <= set(metrics)
    if "GenerationSamples" in config.read_text():
        assert metrics.get("samples/_type") == ["table-file"]
    assert (tmp_path / "runs" / config.stem / "export" / "config.json").is_file()  # the next stage's input
    assert (tmp_path / "runs" / config.stem / "checkpoints" / "last.ckpt").is_file()  # even a 2-step run resumes
    assert f"checkpoints in runs/{config.stem}/checkpoints" in stderr  # said where things go


def test_resume_keeps_the_configs_method_and_refuses_another_methods_checkpoint(demo_home, tmp_path):
    sft, dpo = (next(c for c in CONFIGS if c.stem == name) for name in ("sft_full", "dpo_full"))
    assert cli(["fit", "--config", str(sft), *SHORT_RUN], tmp_path).returncode == 0
    checkpoint = "runs/sft_full/checkpoints/last.ckpt"
    (config_file,) = (tmp_path / "runs" / "sft_full").rglob("config.yaml")
    first_config = config_file.read_text()
    again = cli(["fit", "--config", str(sft), *SHORT_RUN, "--model.learning_rate=0.002"], tmp_path)
    assert again.returncode == 2 and "Traceback" not in again.stderr  # a second run would bury the first's
    assert f"{checkpoint} holds an earlier run's checkpoint" in again.stderr and "--ckpt_path" in again.stderr
    assert config_file.read_text() == first_config
    wrong = cli(["fit", "--config", str(dpo), *SHORT_RUN, f"--ckpt_path={checkpoint}"], tmp_path)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "the checkpoint is of another run: module 'SFTModule' (this run: 'DPOModule')" in wrong.stderr
    resumed = cli(
        ["fit", "--config", str(sft), *SHORT_RUN, "--trainer.max_steps=3", "--model.learning_rate=0.001"]
        + [f"--ckpt_path={checkpoint}"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming with the config's values, which differ from the checkpoint's: learning_rate: 0.003 -> 0.001" in (
        resumed.stderr
    )
    import torch

    saved = torch.load(tmp_path / checkpoint, weights_only=True)
    assert saved["global_step"] == 3 and saved["hyper_parameters"]["learning_rate"] == 0.001  # the override won
    assert sorted(p.name for p in (tmp_path / "runs" / "sft_full" / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]


def test_print_config_round_trips_to_the_same_run(demo_home, tmp_path):
    config = next(c for c in CONFIGS if c.stem == "dpo_lora")
    printed = cli(["fit", "--config", str(config), "--model.beta=0.2", "--print_config"], tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    first = tmp_path / "printed.yaml"
    first.write_text(printed.stdout)
    assert yaml.safe_load(printed.stdout)["model"]["init_args"]["beta"] == 0.2  # overrides land in the config
    again = cli(["fit", "--config", str(first), "--print_config"], tmp_path)
    assert yaml.safe_load(again.stdout) == yaml.safe_load(printed.stdout)

    losses = []
    for source, name in ((config, "original"), (first, "printed")):
        override = [f"--trainer.logger.init_args.save_dir=runs/{name}", f"--trainer.default_root_dir=runs/{name}"]
        override.append("--model.beta=0.2")
        done = cli(["fit", "--config", str(source), *SHORT_RUN, *override], tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        (run_dir,) = (tmp_path / "runs" / name / "wandb").glob("offline-run-*")
        losses.append(logged(run_dir)[1]["train/loss"])
    assert len(losses[0]) == 2 and losses[0] == losses[1]


CONFIG_ERRORS = {
    "unknown-key": (["--model.init_args.betaa=0.2"], "betaa"),
    "wrong-type": (["--model.beta=strong"], "beta"),
    "unknown-loss-type": (["--model.loss_type=dpop"], "unknown loss_type 'dpop'; valid: sigmoid, ipo, hinge, robust"),
    "missing-file": (["--data.train_data=missing.jsonl"], "missing.jsonl: no such file or folder"),
    "missing-model": (["--model.model=no/such-model"], "'no/such-model' could not be loaded"),
}


@pytest.fixture(scope="module")
def error_runs(demo_home, tmp_path_factory):
    config = next(c for c in CONFIGS if c.stem == "dpo_full")
    commands = {name: ["fit", "--config", str(config), *SHORT_RUN, *args] for name, (args, _) in CONFIG_ERRORS.items()}
    return batch_runs(tmp_path_factory.mktemp("errors"), commands)


@pytest.mark.parametrize("name", list(CONFIG_ERRORS))
def test_config_errors_end_with_a_clear_message_not_a_traceback(name, error_runs):
    returncode, stderr, _ = error_runs[name]
    args, message = CONFIG_ERRORS[name]
    assert returncode not in (0, None)
    assert message in stderr.strip().splitlines()[-1]  # one line names the problem, and it is the last
    assert "Traceback" not in stderr, stderr[-3000:]
    if name in ("unknown-key", "wrong-type"):
        assert len(stderr.strip().splitlines()) == 1, stderr  # no usage text before it


GPU_CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "configs" / "gpu").glob("*.yaml"))


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=[c.stem for c in GPU_CONFIGS])
def test_gpu_configs_parse_and_build_on_cpu(config, demo_home, monkeypatch):
    """FSDP, DeepSpeed and CUDA QLoRA configs: parsed and validated by the CLI, module, data and callbacks built
    (the Trainer itself needs the GPUs)."""
    from lightning_align.cli import AlignCLI

    built = {}

    class BuildOnly(AlignCLI):
        def instantiate_trainer(self, **kwargs):
            config_init = self.config_init[self.subcommand] if self.subcommand else self.config_init
            built["callbacks"] = config_init["trainer"]["callbacks"]
            built["strategy"] = config_init["trainer"]["strategy"]
            return None

    cli = BuildOnly(["--config", str(config)], run=False)  # run=False: no subcommand
    assert type(cli.model).__name__ in ("SFTModule", "DPOModule") and cli.datamodule.tokenizer is not None
    assert any(type(c).__name__ == "ExportPretrained" for c in built["callbacks"])
    strategy = built["strategy"]
    expected = {"fsdp": "ModelParallelStrategy", "deepspeed": "deepspeed_stage", "cuda": "auto"}
    key = next(k for k in expected if k in config.stem)
    assert expected[key] in (strategy if isinstance(strategy, str) else type(strategy).__name__)


@pytest.mark.parametrize("value, expected", [("selective", "selective"), ("true", True), ("false", False)])
def test_checkpointing_kind_is_selectable_from_the_command_line(value, expected, demo_home):
    from lightning_align.cli import AlignCLI

    class BuildOnly(AlignCLI):
        def instantiate_trainer(self, **kwargs):
            return None

    config = next(c for c in CONFIGS if c.stem == "sft_full")
    cli = BuildOnly(["--config", str(config), f"--model.gradient_checkpointing={value}"], run=False)
    assert cli.model.gradient_checkpointing == expected and type(cli.model.gradient_checkpointing) is type(expected)


def test_a_weighted_mixture_of_loss_types_is_selectable_from_yaml(demo_home, tmp_path):
    config = next(c for c in CONFIGS if c.stem == "dpo_full")
    mixture = ["--model.loss_type=[sigmoid, bco_pair, sft]", "--model.loss_weights=[0.8, 0.2, 1.0]"]
    done = cli(["fit", "--config", str(config), *SHORT_RUN, *mixture, "--model.ld_alpha=0.5"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "dpo_full" / "wandb").glob("offline-run-*")
    config_logged, metrics = logged(run_dir)
    init_args = config_logged["run"]["model"]["init_args"]
    assert init_args["loss_type"] == ["sigmoid", "bco_pair", "sft"] and init_args["loss_weights"] == [0.8, 0.2, 1.0]
    assert init_args["ld_alpha"] == 0.5 and len(metrics["train/loss"]) == 2


def test_only_the_subcommands_the_modules_support_are_offered(demo_home, tmp_path):
    from lightning_align.cli import AlignCLI

    assert set(AlignCLI.subcommands()) == {"fit", "validate"}
    config = next(c for c in CONFIGS if c.stem == "sft_full")
    done = cli(["test", "--config", str(config)], tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "test" in done.stderr.strip().splitlines()[-1]
