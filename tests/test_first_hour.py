"""What a newcomer sees: no misleading warnings, the metrics that matter in the progress bar, short help, and
example configs that clip gradients as TRL does."""

import subprocess
import sys
import warnings
from pathlib import Path

import yaml

from lightning_align import DPOModule, PreferenceDataModule, SFTDataModule, SFTModule
from tests.conftest import trainer

CONFIGS = sorted((Path(__file__).parents[1] / "examples" / "configs").glob("*.yaml"))


def test_resuming_mid_epoch_does_not_warn_that_the_loader_cannot(tiny_model, task_files, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, ckpt_path=None):
        dm = SFTDataModule(tiny_model, task_files["sft_train"], batch_size=8, max_length=48)
        checkpoints = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
        fit = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True, callbacks=[checkpoints])
        fit.fit(SFTModule(tiny_model), datamodule=dm, ckpt_path=ckpt_path)

    run(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(3, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert not [w for w in caught if "not resumable" in str(w.message)]


def test_dpo_shows_reward_accuracy_and_margin_in_the_progress_bar(tiny_model, task_files, tmp_path):
    dm = PreferenceDataModule(tiny_model, task_files["preference_train"], batch_size=4, max_length=48)
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(DPOModule(tiny_model), datamodule=dm)
    assert {"train/loss", "rewards/accuracies", "rewards/margins"} <= set(fit.progress_bar_metrics)


def test_dependencies_deprecations_a_user_cannot_act_on_are_silenced():
    script = (
        "import warnings, lightning_align\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', UserWarning)\n"
        "warnings.warn('something a user should see', FutureWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "something a user should see" in done.stderr
    assert "is_gradient_checkpointing" not in done.stderr and "LeafSpec" not in done.stderr
    assert "kernels-community" not in done.stderr  # bitsandbytes' optional-kernel message on import


def test_module_help_lists_the_modules_own_options(tiny_model):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_align", "fit", "--model.help", "DPOModule"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--model.beta" in done.stdout
    assert len(done.stdout.splitlines()) < 120  # every nn.Module subclass was listed: over 500 lines


def test_example_configs_clip_gradients_and_keep_a_last_checkpoint():
    for config in CONFIGS:
        settings = yaml.safe_load(config.read_text())
        callbacks = [c["class_path"] for c in settings["trainer"]["callbacks"]]
        assert "lightning_align.LastCheckpoint" in callbacks, config.name
        if config.stem.startswith(("ppo", "grpo")):  # manual optimisation: they clip with their own max_grad_norm
            assert "gradient_clip_val" not in settings["trainer"], config.name
        else:
            assert settings["trainer"]["gradient_clip_val"] == 1.0, config.name
